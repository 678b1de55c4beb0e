"""Generated tokens/s of ``medsft predict`` (default engine, and ``--engine vllm``) vs the seed's
one-question-at-a-time ``generate`` loop.

Same model, same questions, same greedy decoding and ``max_new_tokens``, measured side by side in one
run; model loading (and vLLM's start and shutdown) is excluded on every side. The vLLM column needs a Python
with vLLM (``--vllm_python``, default ``$MEDSFT_VLLM_PYTHON``); without one it is left out.

    python benchmarks/predict_throughput.py                     # tiny Qwen3, CPU, 13 questions, batch 8
    python benchmarks/predict_throughput.py --model /path/to/hf_model --batch_size 16 --vllm_batch 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsft_lightning import hub  # noqa: E402
from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT, prompt_messages  # noqa: E402


def questions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in hub.sample_dataset_path().open(encoding="utf-8")]
    return [{"id": i, "question": rows[i % len(rows)]["question"]} for i in range(n)]


def one_by_one(model, tokenizer, rows, max_new_tokens: int) -> tuple[float, int]:
    """The seed's inference script: one chat-templated question per generate call."""
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    start, generated = time.perf_counter(), 0
    for row in rows:
        text = tokenizer.apply_chat_template(prompt_messages(row, DEFAULT_SYSTEM_PROMPT), tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer([text], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        generated += next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
    return time.perf_counter() - start, generated


def questions_datamodule(model_path: str, rows, batch_size: int, workdir: Path, answers: str):
    """The questions written as ``medsft predict``'s input file, the DataModule that reads them, and the
    answer file to write."""
    from medsft_lightning.data.datamodule import MedicalDataModule

    qfile = workdir / "questions.jsonl"
    qfile.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    dm = MedicalDataModule(dataset="medsft:sample", tokenizer=model_path, predict_dataset=str(qfile),
                           batch_size=batch_size)
    return dm, workdir / answers


def medsft_predict(model_path: str, rows, batch_size: int, max_new_tokens: int, workdir: Path) -> tuple[float, int]:
    """``medsft predict``'s own path: DataModule (sorted batches) → predict_step → AnswerWriter."""
    import lightning as L

    from medsft_lightning.generation.generate import Generation
    from medsft_lightning.generation.predict import AnswerWriter
    from medsft_lightning.training.module import MedSFTModule

    dm, out = questions_datamodule(model_path, rows, batch_size, workdir, "answers.jsonl")
    module = MedSFTModule(model_path, generation=Generation(max_new_tokens=max_new_tokens, do_sample=False))
    module.configure_model()  # load outside the timed region, as on the other side
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[AnswerWriter(str(out))])
    dm.load_tokenizer()
    start = time.perf_counter()
    trainer.predict(module, datamodule=dm, return_predictions=False)
    elapsed = time.perf_counter() - start
    answers = [json.loads(line) for line in out.open(encoding="utf-8")]
    assert len(answers) == len(rows)
    return elapsed, sum(a["num_generated_tokens"] for a in answers)


def vllm_predict(model_path: str, rows, batch_size: int, max_new_tokens: int, workdir: Path,
                 python: str) -> tuple[float, int]:
    """``medsft predict --engine vllm``'s path: the same DataModule → predict_step → AnswerWriter, decoded by the
    vLLM worker (started before and ended after the timed region)."""
    import lightning as L

    from medsft_lightning.generation.generate import Generation
    from medsft_lightning.generation.predict import AnswerWriter
    from medsft_lightning.generation.vllm_engine import VllmEngine
    from medsft_lightning.training.module import MedSFTModule

    dm, out = questions_datamodule(model_path, rows, batch_size, workdir, "answers_vllm.jsonl")
    module = MedSFTModule(model_path, generation=Generation(max_new_tokens=max_new_tokens, do_sample=False))
    engine = module.predict_engine = VllmEngine(python, model_path, "float32")
    engine.on_predict_end = lambda trainer, pl_module: None  # closed after the timed region
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[AnswerWriter(str(out)), engine])
    dm.load_tokenizer()
    engine.start(max_model_len=2048 + max_new_tokens)  # on_predict_start then finds it running
    try:
        start = time.perf_counter()
        trainer.predict(module, datamodule=dm, return_predictions=False)
        elapsed = time.perf_counter() - start
    finally:
        engine.close()
    answers = [json.loads(line) for line in out.open(encoding="utf-8")]
    assert len(answers) == len(rows)
    return elapsed, sum(a["num_generated_tokens"] for a in answers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=hub.TINY_MODEL, help="model folder or medsft:tiny-qwen3")
    p.add_argument("--questions", type=int, default=13)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--vllm_batch", type=int, default=64, help="questions per vLLM generate call (--vllm_batch)")
    p.add_argument("--vllm_python", default=None, help="the Python with vLLM (default: $MEDSFT_VLLM_PYTHON)")
    args = p.parse_args()
    torch.manual_seed(0)
    model_path = hub.resolve_model(args.model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = questions(args.questions)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    base_s, base_tokens = one_by_one(model, tokenizer, rows, args.max_new_tokens)
    from medsft_lightning.tools.vllm_env import VllmMissing, vllm_python

    try:
        python = vllm_python(args.vllm_python)
    except VllmMissing as err:
        python = None
        print(f"vLLM column left out: {err}")
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, ours_tokens = medsft_predict(model_path, rows, args.batch_size, args.max_new_tokens, Path(tmp))
        if python:
            vllm_s, vllm_tokens = vllm_predict(model_path, rows, args.vllm_batch, args.max_new_tokens, Path(tmp),
                                               python)
            ours, theirs = ([json.loads(line) for line in (Path(tmp) / name).open(encoding="utf-8")]
                            for name in ("answers.jsonl", "answers_vllm.jsonl"))
            same = sum(a == b for a, b in zip(ours, theirs))
    base_rate, ours_rate = base_tokens / base_s, ours_tokens / ours_s
    print(f"{args.questions} questions, max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}")
    print(f"one-by-one generate loop          {base_tokens:6d} tokens in {base_s:7.2f} s = {base_rate:8.1f} tokens/s")
    print(f"medsft predict (batch {args.batch_size:3d})         {ours_tokens:6d} tokens in {ours_s:7.2f} s = "
          f"{ours_rate:8.1f} tokens/s  {ours_rate / base_rate:5.2f}x")
    if python:
        vllm_rate = vllm_tokens / vllm_s
        print(f"medsft predict --engine vllm ({args.vllm_batch:3d}) {vllm_tokens:6d} tokens in {vllm_s:7.2f} s = "
              f"{vllm_rate:8.1f} tokens/s  {vllm_rate / base_rate:5.2f}x ({vllm_rate / ours_rate:.2f}x the default "
              "engine)")
        print(f"the same answers from both engines (text, token count, finish_reason): {same} of {len(rows)}")


if __name__ == "__main__":
    main()
