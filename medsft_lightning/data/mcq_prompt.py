"""A multiple-choice question as chat messages, and as the prompt ids ``medsft eval``'s scorers feed a model.

Pure message building first (the wording follows the question's language: Chinese when it holds a CJK
character, else English), then the tokenizer's own chat template turns the messages into ids:

- ``loglik``: the question and its lettered options, asking for the text of the correct option; rendered with
  ``enable_thinking=False``, so Qwen3's template pre-fills the empty think block ``<think>\\n\\n</think>\\n\\n``
  and each option's text is scored right after it;
- ``generate``: the same question asking for a last line ``答案：X`` / ``Answer: X`` (letters of every correct
  option for a multi-answer question, which the prompt says it is, as CMB's does), with thinking on;
- the thinking-mode checks: the same messages with ``enable_thinking=False``, or with ``/no_think`` appended to
  the user turn (Qwen3's soft switch; the template still opens a thinking turn, the model must close it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from medsft_lightning.data.formatting import NO_THINK

_CJK = re.compile(r"[\u3400-\u9fff]")
EMPTY_THINK = "<think>\n\n</think>\n\n"
MODES = ("think", "no_think_flag", "no_think_switch")  # thinking on; enable_thinking=False; /no_think


def is_chinese(text: str) -> bool:
    """True when ``text`` holds a CJK ideograph."""
    return bool(_CJK.search(text))


def options_text(question: Mapping) -> str:
    """``A. …`` lines, one per option."""
    return "\n".join(f"{letter}. {text}" for letter, text in question["options"].items())


def user_text(question: Mapping, scorer: str) -> str:
    """The user turn for ``scorer`` (``loglik`` or ``generate``)."""
    zh, multi = is_chinese(question["question"]), len(question["answer"]) > 1
    body = f"{question['question']}\n\n{options_text(question)}"
    if scorer == "loglik":
        return (f"以下是一道医学选择题。\n\n{body}\n\n请直接写出正确选项的内容。" if zh else
                f"The following is a medical multiple-choice question.\n\n{body}\n\nReply with the text of the "
                "correct option.")
    if zh:
        kind = "多项选择题，有两个或更多正确答案，请选出全部正确答案" if multi else "单项选择题，请选出唯一正确的答案"
        last = "全部正确选项的字母，如“答案：AC”" if multi else "正确选项的字母，如“答案：B”"
        return f"以下是一道医学{kind}。\n\n{body}\n\n回答的最后一行写“答案：”加{last}。"
    kind = ("has two or more correct options; choose all of them" if multi else "has exactly one correct option")
    last = "the letters of all correct options, e.g. 'Answer: AC'" if multi else "its letter, e.g. 'Answer: B'"
    return (f"The following medical multiple-choice question {kind}.\n\n{body}\n\nEnd your reply with a line "
            f"'Answer: ' followed by {last}.")


def messages(question: Mapping, scorer: str, system_prompt: str | None, no_think: bool = False) -> list[dict]:
    """System (when given) and user messages; ``no_think`` appends Qwen3's ``/no_think`` to the user turn."""
    text = user_text(question, scorer) + (f" {NO_THINK}" if no_think else "")
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": text}]


def render(tokenizer, questions: Sequence[Mapping], scorer: str, system_prompt: str | None,
           mode: str = "think") -> list[str]:
    """The prompt texts of ``questions`` through the chat template (generation prompt opened).

    ``mode``: ``think`` (thinking on), ``no_think_flag`` (``enable_thinking=False``) or ``no_think_switch``
    (``/no_think`` in the user turn). The ``loglik`` scorer always renders with ``enable_thinking=False`` and
    checks that the template pre-filled the empty think block (a template without Qwen3's switch cannot be
    scored this way).
    """
    flag = scorer == "loglik" or mode == "no_think_flag"
    texts = tokenizer.apply_chat_template(
        [messages(q, scorer, system_prompt, no_think=mode == "no_think_switch") for q in questions],
        tokenize=False, add_generation_prompt=True, enable_thinking=not flag)
    if flag and texts and not texts[0].endswith(EMPTY_THINK):
        raise ValueError("the chat template ignores enable_thinking=False (its generation prompt does not end with "
                         "an empty think block): medsft eval needs a Qwen3-style template")
    return list(texts)


def prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts (no special tokens added: the template wrote them)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
