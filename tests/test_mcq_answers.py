"""Reading the answer letters of generated replies, the thinking-mode checks, and the thinking budget's two rounds."""

from __future__ import annotations

import pytest

from medsft_lightning.generation.mcq_answers import extract_letters
from medsft_lightning.generation.mcq_generate import budgeted, score_replies
from medsft_lightning.generation.think_checks import check_reply, rates

THINK_ZH = ("<think>\n患者突发胸痛，心电图ST段抬高。A稳定型心绞痛不会持续40分钟；C心包炎为广泛ST抬高；"
            "D夹层多为撕裂样痛。\n</think>\n\n")
THINK_EN = "<think>\nOption A is tempting, but B fits the ECG better. C and D do not explain the fever.\n</think>\n\n"

# (reply as generated, the question's option letters, the letters read; None: unparseable)
OUTPUTS = [
    (THINK_ZH + "答案：B", "ABCDE", "B"),
    (THINK_ZH + "根据以上分析，最可能的诊断是急性前壁心肌梗死。\n答案：B", "ABCDE", "B"),
    (THINK_ZH + "正确答案是C。", "ABCDE", "C"),
    (THINK_ZH + "综上，本题应选 D。", "ABCDE", "D"),
    (THINK_ZH + "故选B", "ABCD", "B"),
    (THINK_ZH + "B. 急性前壁心肌梗死", "ABCDE", "B"),
    (THINK_ZH + "答案为 A、B、C", "ABCD", "ABC"),  # multi-answer
    (THINK_ZH + "答案：ABD\n\n解析：C选项低血压不是激素的不良反应。", "ABCD", "ABD"),  # later text names C
    (THINK_ZH + "答案：C\n\n解析：A选项……", "ABCDE", "C"),
    (THINK_ZH + "我不确定，可能是心绞痛。", "ABCDE", None),
    (THINK_EN + "Answer: B", "ABCD", "B"),
    (THINK_EN + "The answer is (C).", "ABCD", "C"),
    (THINK_EN + "**Answer:** A and C", "ABCD", "AC"),  # multi-answer
    (THINK_EN + "Final answer: \\boxed{D}", "ABCD", "D"),
    (THINK_EN + "The correct option is E because it binds the receptor.", "ABCDE", "E"),
    (THINK_EN + "A is wrong and B is wrong. Answer: C", "ABCD", "C"),  # last statement wins
    (THINK_EN + "(A)", "ABCD", "A"),
    (THINK_EN + "Answer: A, B, D", "ABCDE", "ABD"),
    (THINK_EN + "Answer: DNA polymerase inhibitors.", "ABCD", None),  # a word, not a letter
    (THINK_EN + "Answer: F", "ABCD", None),  # not an option
    (THINK_EN + "I cannot decide between the options.", "ABCD", None),
    ("<think>\nA? B? Option C says 答案：C, but", "ABCD", None),  # truncated think: no answer at all
    ("<think>\n\n</think>\n\nAnswer: E", "ABCDE", "E"),  # /no_think: the empty block, then the answer
    (THINK_EN, "ABCD", None),  # nothing after </think>
]


@pytest.mark.parametrize("raw, options, letters", OUTPUTS)
def test_answer_letters_come_from_the_text_after_think(raw, options, letters):
    assert extract_letters(raw, options).letters == letters


def test_the_table_is_big_and_varied():
    assert len(OUTPUTS) >= 20
    assert sum(letters is not None and len(letters) > 1 for _, _, letters in OUTPUTS) >= 3
    assert sum(raw.startswith(THINK_ZH) for raw, _, _ in OUTPUTS) >= 8


def test_unparseable_reasons_and_without_thinking():
    assert extract_letters("<think>C is right", "ABCD").reason == "think not closed: no answer"
    assert extract_letters(THINK_EN + "Answer: F", "ABCD").reason == "letter(s) F not among the options ABCD"
    assert extract_letters("答案：C", "ABCD", thinking=False).letters == "C"  # enable_thinking=False: all is answer
    assert extract_letters("答案：C", "ABCD", thinking=True).letters is None
    scored = score_replies([{"options": {"A": "x", "B": "y"}, "answer": "B"}],
                           [{"raw": THINK_EN + "Answer: B", "finish_reason": "stop", "forced_think_end": False}])
    assert scored[0]["chosen"] == "B" and scored[0]["correct"] and scored[0]["unparseable"] is None


@pytest.mark.parametrize("mode, reply, failed", [
    ("think", {"raw": THINK_EN + "Answer: B", "finish_reason": "stop"}, []),
    ("think", {"raw": "Answer: B", "finish_reason": "stop"}, ["starts_with_think", "closed_once", "answer_after"]),
    ("think", {"raw": THINK_EN + "<think>again</think> B", "finish_reason": "stop"}, ["closed_once",
                                                                                     "no_second_think"]),
    ("think", {"raw": "<think>long</think>\n\nB", "finish_reason": "stop", "forced_think_end": True},
     ["within_budget"]),
    ("think", {"raw": THINK_EN, "finish_reason": "length"}, ["answer_after", "within_budget"]),
    ("no_think_flag", {"raw": "Answer: B", "finish_reason": "stop"}, []),
    ("no_think_flag", {"raw": "<think>hmm</think> B", "finish_reason": "stop"}, ["no_think_text"]),
    ("no_think_switch", {"raw": "<think>\n\n</think>\n\nAnswer: B", "finish_reason": "stop"}, []),
    ("no_think_switch", {"raw": THINK_EN + "Answer: B", "finish_reason": "stop"}, ["empty_think_block"]),
    ("no_think_switch", {"raw": "Answer: B", "finish_reason": "stop"}, ["empty_think_block", "answer_after"]),
])
def test_thinking_mode_checks(mode, reply, failed):
    checks = check_reply(mode, reply)
    assert sorted(name for name, ok in checks.items() if not ok) == sorted(failed)


def test_rates_are_shares_of_replies():
    replies = [{"raw": "<think>\n\n</think>\n\nB", "finish_reason": "stop"}, {"raw": "B", "finish_reason": "stop"},
               {"raw": "<think>x</think>B", "finish_reason": "length"}]
    assert rates("no_think_switch", replies) == {"empty_think_block": 1 / 3, "answer_after": 2 / 3,
                                                 "finished": 2 / 3, "pass": 1 / 3, "n": 3}


def test_the_budget_forces_think_close_and_continues_only_unfinished_replies():
    """A stand-in engine: prompt 1 finishes in round one, prompt 2 closes its think but runs out, prompt 3 never
    closes it: ``</think>`` (9) is appended and only prompts 2 and 3 get a second round."""
    stop, close = 0, 9
    scripts = {1: [5, 9, 6, stop], 2: [5, 9, 6, 6], 3: [5, 5, 5, 5]}
    calls = []

    def engine(prompts, max_new_tokens):
        calls.append(([list(p) for p in prompts], max_new_tokens))
        return [scripts[p[0]][:max_new_tokens] if len(p) == 1 else [7, stop] for p in prompts]

    out = budgeted(engine, [[1], [2], [3]], [stop], close, max_think_tokens=4, max_answer_tokens=3, thinking=True)
    assert out == [([5, 9, 6, stop], False), ([5, 9, 6, 6, 7, stop], False), ([5, 5, 5, 5, 9, 7, stop], True)]
    assert calls == [([[1], [2], [3]], 4), ([[2, 5, 9, 6, 6], [3, 5, 5, 5, 5, 9]], 3)]
    calls.clear()
    assert budgeted(engine, [[1]], [stop], close, 4, 3, thinking=False) == [([5, 9, 6], False)]
    assert calls == [([[1]], 3)]
