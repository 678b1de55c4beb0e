"""The ``loglik`` scorer against lm-evaluation-harness: the same questions and prompts as a local ``multiple_choice``
task through its ``HFLM`` on the tiny model; the same option picked for every question, the same log-likelihoods.

lm-eval moves the prompt's trailing whitespace (the ``\\n\\n`` after Qwen3's empty think block) into every
continuation (``_encode_pair``), so each of its option log-likelihoods is ours plus one constant per question:
log P(``\\n\\n``). The differences are checked to be equal across a question's options; its ``acc`` and
``acc_norm`` are then the same decisions as ours.
"""

from __future__ import annotations

import json

import pytest
import torch

from medsft_lightning.data.benchmarks import MCQ_SAMPLE, load_benchmark
from medsft_lightning.data.mcq_prompt import render
from medsft_lightning.generation.mcq_loglik import pick, score_loglik

lm_eval = pytest.importorskip("lm_eval")  # in the dev extra
IDS = ("zh-02", "zh-10", "en-02", "en-09")

TASK = """task: medsft_mcq_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_loglik_picks_what_lm_eval_picks_on_the_same_prompts(tmp_path, tiny_dir, tokenizer):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    questions = [q for q in load_benchmark(MCQ_SAMPLE).questions if q["id"] in IDS]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ours = score_loglik(model, tokenizer, questions, system_prompt=None)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"prompt": text, "choices": list(q["options"].values()),
                                        "gold": list(q["options"]).index(q["answer"])}, ensure_ascii=False) + "\n"
                            for text, q in zip(render(tokenizer, questions, "loglik", None), questions)),
                    encoding="utf-8")
    (tmp_path / "task.yaml").write_text(TASK.format(docs=docs, cache=tmp_path / "hf-cache"), encoding="utf-8")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    result = simple_evaluate(model=lm, tasks=["medsft_mcq_check"], task_manager=TaskManager(include_path=str(tmp_path)),
                             log_samples=True)
    samples = sorted(result["samples"]["medsft_mcq_check"], key=lambda s: s["doc_id"])
    assert len(samples) == len(questions) == len(IDS)
    for sample, mine, question in zip(samples, ours, questions):
        theirs = [resp[0][0] for resp in sample["resps"]]
        letters = list(question["options"])
        assert letters[pick(theirs)] == mine["chosen"], question["id"]
        assert sample["acc"] == float(mine["correct"]) and sample["acc_norm"] is not None
        offsets = [t - m for t, m in zip(theirs, mine["logliks"].values())]
        assert max(offsets) - min(offsets) < 1e-3, (question["id"], offsets)  # one constant: log P("\n\n")
        assert offsets[0] < 0
        lengths = [len(text) for text in question["options"].values()]
        shifted = [(t - offsets[0]) / n for t, n in zip(theirs, lengths)]
        assert letters[pick(shifted)] == mine["chosen_norm"], question["id"]
    accuracy = result["results"]["medsft_mcq_check"]["acc,none"]
    assert accuracy == pytest.approx(sum(m["correct"] for m in ours) / len(ours))
