"""Qwen3-1.7B architecture (random weights) on one GPU: medsft's training step vs the seed recipe.

Both sides train the same rows (``--seq`` tokens each, the first ``--prompt`` masked) in bf16 with
gradient checkpointing. Printed side by side in one run: supervised tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``) and MFU (model FLOPs 6·N + 6·L·H·S per token, causal attention,
against the GPU's dense bf16 peak).

    python benchmarks/gpu_qwen3_1p7b.py                 # on a GPU
    python benchmarks/gpu_qwen3_1p7b.py --tiny --steps 2 # a CPU dry run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_1P7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN3_1P7B, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def write_model(path: Path, arch: dict, dtype: torch.dtype) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**arch, eos_token_id=151645, pad_token_id=151643, bos_token_id=None)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    return n


def make_rows(n_rows: int, seq: int, prompt: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(0, 151000, (seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": [-100] * prompt + ids[prompt:],
                     "num_supervised": seq - prompt, "row_id": i})
    return rows


def flops_per_token(n_params: int, arch: dict, seq: int) -> float:
    return 6 * n_params + 6 * arch["num_hidden_layers"] * arch["num_attention_heads"] * arch["head_dim"] * seq


class Timer:
    """Times optimizer steps after warm-up; resets the CUDA peak-memory counter at fit start."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.t0 = warmup, [], None

    def start(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def stop(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)

    def per_step(self) -> float:
        timed = self.times[self.warmup :]
        return sum(timed) / max(1, len(timed))


def measure_peak(train) -> int:
    """Run ``train()`` and return the peak GPU memory it allocated (0 on CPU).

    Garbage from an earlier run (Lightning holds reference cycles) is collected first, so it is not counted.
    """
    gpu = torch.cuda.is_available()
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train()
    return torch.cuda.max_memory_allocated() if gpu else 0


def run_medsft(model_dir: Path, rows, batch: int, accumulate: int, steps: int, ckpt: bool, chunk: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from medsft_lightning.data.collate import pad_collate
    from medsft_lightning.data.datamodule import EncodedDataset
    from medsft_lightning.data.sampler import WindowBatchSampler
    from medsft_lightning.training.module import MedSFTModule

    timer = Timer(warmup=2)

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            if i % accumulate == 0:
                timer.start()

        def on_train_batch_end(self, trainer, pl_module, out, b, i):
            if (i + 1) % accumulate == 0:
                timer.stop()

    ds = EncodedDataset(rows)
    sampler = WindowBatchSampler([r["num_supervised"] for r in rows], batch, accumulate, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=lambda b: pad_collate(b, 151643))
    module = MedSFTModule(str(model_dir), gradient_checkpointing=ckpt, learning_rate=1e-5, loss_chunk_size=chunk)
    gpu = torch.cuda.is_available()
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-true" if gpu else "32-true",
                        max_steps=steps, accumulate_grad_batches=accumulate, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[StepTimer()], use_distributed_sampler=False)
    peak = measure_peak(lambda: trainer.fit(module, train_dataloaders=loader))
    return {"s_per_step": timer.per_step(), "peak_bytes": peak,
            "supervised_tokens_per_step": sum(r["num_supervised"] for r in rows[: batch * accumulate])}


def run_seed(model_dir: Path, rows, steps: int) -> dict:
    """The seed recipe: HF Trainer, batch 1 x accumulation 4, bf16, checkpointing, DataCollatorForSeq2Seq."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    gpu = torch.cuda.is_available()
    timer = Timer(warmup=2)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.start()

        def on_step_end(self, args, state, control, **kw):
            timer.stop()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    model.enable_input_require_grads()

    class Tok:  # DataCollatorForSeq2Seq only needs the pad id and side from the tokenizer
        pad_token_id, padding_side = 151643, "right"

        def pad(self, features, **kw):
            width = max(len(f["input_ids"]) for f in features)
            return {k: torch.tensor([f[k] + [0] * (width - len(f[k])) for f in features]) for k in features[0]}

    data = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows]
    args = TrainingArguments(output_dir="/tmp/seed-out", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                             max_steps=steps, learning_rate=1e-5, bf16=gpu, gradient_checkpointing=True,
                             logging_steps=1000, save_strategy="no", report_to="none", dataloader_num_workers=0,
                             use_cpu=not gpu)
    collator = DataCollatorForSeq2Seq(Tok(), padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[StepTimer()])
    peak = measure_peak(trainer.train)
    return {"s_per_step": timer.per_step(), "peak_bytes": peak,
            "supervised_tokens_per_step": sum(r["num_supervised"] for r in rows[:4])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny architecture (CPU dry run)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args()
    arch = TINY if args.tiny else QWEN3_1P7B
    model_dir = Path("/tmp/qwen3-bench-model")
    n_params = write_model(model_dir, arch, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    print(f"model: {n_params / 1e9:.3f}B params, seq {args.seq}, device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}", flush=True)
    rows = make_rows(8 * (args.steps + 1), args.seq, args.prompt)
    fpt = flops_per_token(n_params, arch, args.seq)
    results = {}
    plans = [("seed recipe (HF Trainer, 1x4, ckpt)", lambda: run_seed(model_dir, rows, args.steps)),
             ("medsft 4x1, ckpt", lambda: run_medsft(model_dir, rows, 4, 1, args.steps, True, 1024)),
             ("medsft 2x2, ckpt", lambda: run_medsft(model_dir, rows, 2, 2, args.steps, True, 1024)),
             ("medsft 4x1, no ckpt", lambda: run_medsft(model_dir, rows, 4, 1, args.steps, False, 1024))]
    for name, fn in plans:
        try:
            r = fn()
        except torch.OutOfMemoryError as err:
            print(f"{name}: out of memory ({err})", flush=True)
            continue
        tokens = r["supervised_tokens_per_step"]
        total_tokens = tokens / (args.seq - args.prompt) * args.seq
        r["supervised_tokens_per_s"] = tokens / r["s_per_step"]
        r["mfu"] = fpt * total_tokens / r["s_per_step"] / (args.peak_tflops * 1e12)
        results[name] = r
        print(f"{name:40s} {r['supervised_tokens_per_s']:10.0f} sup tok/s  peak {r['peak_bytes'] / 2**30:6.2f} GiB"
              f"  MFU {100 * r['mfu']:5.1f}%", flush=True)
    seed = results.get("seed recipe (HF Trainer, 1x4, ckpt)")
    if seed:
        for name, r in results.items():
            speed = r["supervised_tokens_per_s"] / seed["supervised_tokens_per_s"]
            memory = r["peak_bytes"] / max(1, seed["peak_bytes"])
            print(f"ratio vs seed  {name:40s} speed {speed:5.2f}x  memory {memory:5.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_qwen3_1p7b.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
