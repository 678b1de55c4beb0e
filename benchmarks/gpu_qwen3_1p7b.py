"""Qwen3-1.7B architecture (random weights) on one GPU: medsft's training step with every ``model.optimizer``
choice, optimizer-in-backward and per-layer ``torch.compile``, beside the seed recipe, in one command.

Every run trains the same rows (``--seq`` tokens each, the first ``--prompt`` masked) with gradient checkpointing.
Printed side by side: supervised tokens/s, peak GPU memory (``torch.cuda.max_memory_allocated``; and reserved by
the caching allocator), the process's whole device use at that peak (reserved + the CUDA context measured before
the first tensor), ``medsft memory``'s estimate for the same settings, and MFU (model FLOPs 6·N + 6·L·H·S per token,
causal attention, against the GPU's dense bf16 peak, ``--peak_tflops``).

Runs (``--runs``, default all; ~6-7 min on one H200 with the defaults, each compiled step's first call included):
  seed          the seed recipe: HF Trainer, batch 1 x accumulation 4, bf16, checkpointing, DataCollatorForSeq2Seq
  8bit          medsft, configs/full.yaml's step: batch 4, chunk 512, clip 1.0, optimizer adamw8bit_sr
  kahan         the same with optimizer kahan (torch-optimi, bf16 moments + compensation)
  adamw         the same with optimizer adamw (torch fused AdamW on bf16 weights)
  fp32          bf16-mixed: fp32 master weights and moments (the fidelity reference)
  8bit-inback   adamw8bit_sr stepped inside backward (no clipping: it is refused there)
  8bit-compile  adamw8bit_sr with model.compile_layers (each decoder layer compiled)

    python benchmarks/gpu_qwen3_1p7b.py                       # on a GPU (needs `accelerate` for the seed side)
    python benchmarks/gpu_qwen3_1p7b.py --tiny --steps 3      # a CPU dry run of the script itself (fp32)
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
TINY = dict(QWEN3_1P7B, vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# name: (model.optimizer, precision on a GPU, optimizer_in_backward, compile_layers)
MEDSFT_RUNS = {"8bit": ("adamw8bit_sr", "bf16-true", False, False), "kahan": ("kahan", "bf16-true", False, False),
               "adamw": ("adamw", "bf16-true", False, False), "fp32": ("adamw", "bf16-mixed", False, False),
               "8bit-inback": ("adamw8bit_sr", "bf16-true", True, False),
               "8bit-compile": ("adamw8bit_sr", "bf16-true", False, True)}
RUNS = ["seed", *MEDSFT_RUNS]


def write_model(path: Path, arch: dict, dtype: torch.dtype, device: str) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**arch, eos_token_id=151645, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    return n


def make_rows(n_rows: int, seq: int, prompt: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(1, vocab - 1, (seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": [-100] * prompt + ids[prompt:],
                     "num_supervised": seq - prompt, "row_id": i})
    return rows


def flops_per_token(n_params: int, arch: dict, seq: int) -> float:
    return 6 * n_params + 6 * arch["num_hidden_layers"] * arch["num_attention_heads"] * arch["head_dim"] * seq


class Timer:
    """Times optimizer steps after warm-up."""

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
        timed = self.times[self.warmup :] or self.times
        return sum(timed) / max(1, len(timed))


def measure_peak(train) -> tuple[int, int]:
    """Run ``train()``; (peak allocated, peak reserved) GPU bytes (0 on CPU). Earlier runs' garbage is collected
    first (Lightning holds reference cycles) and the cache emptied, so it is not counted."""
    gpu = torch.cuda.is_available()
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train()
    return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if gpu else (0, 0)


def run_medsft(model_dir: Path, rows, name: str, steps: int, seq: int, chunk: int, vocab: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from medsft_lightning.data.collate import pad_collate
    from medsft_lightning.data.datamodule import EncodedDataset
    from medsft_lightning.data.sampler import WindowBatchSampler
    from medsft_lightning.training.module import MedSFTModule

    choice, precision, in_backward, compile_layers = MEDSFT_RUNS[name]
    gpu = torch.cuda.is_available()
    timer, batch = Timer(warmup=2), 4

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            timer.start()

        def on_train_batch_end(self, trainer, pl_module, out, b, i):
            timer.stop()

    if not gpu and choice == "adamw8bit_sr":  # the CPU dry run: torchao's compiled step, as on the GPU
        from medsft_lightning.training.optim_lowbit import adamw8bit_sr_class

        adamw8bit_sr_class().compile_on_cpu = True
    ds = EncodedDataset(rows)
    sampler = WindowBatchSampler([r["num_supervised"] for r in rows], batch, 1, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=lambda b: pad_collate(b, 0))
    module = MedSFTModule(str(model_dir), gradient_checkpointing=True, learning_rate=1e-5, loss_chunk_size=chunk,
                          optimizer=choice, optimizer_in_backward=in_backward, compile_layers=compile_layers)
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision=precision if gpu else "32-true",
                        max_steps=steps, gradient_clip_val=None if in_backward else 1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[StepTimer()], use_distributed_sampler=False)
    peak, reserved = measure_peak(lambda: trainer.fit(module, train_dataloaders=loader))
    est = estimate_gib(precision if gpu else "32-true", batch, seq, chunk, choice, in_backward, gpu, vocab)
    return {"s_per_step": timer.per_step(), "peak_bytes": peak, "reserved_bytes": reserved, "estimate_gib": est,
            "supervised_tokens_per_step": sum(r["num_supervised"] for r in rows[:batch])}


def estimate_gib(precision: str, batch: int, seq: int, chunk: int, choice: str, in_backward: bool, gpu: bool,
                 vocab: int) -> float:
    """``medsft memory``'s total for these settings (with the device allowances on a GPU)."""
    from medsft_lightning.tools.memory import GIB, QWEN3_ARCHS
    from medsft_lightning.tools.memory_report import estimate_for
    from medsft_lightning.tools.memory_settings import Settings

    arch = QWEN3_ARCHS["Qwen/Qwen3-1.7B"] if vocab == QWEN3_1P7B["vocab_size"] else None
    if arch is None:
        return float("nan")
    s = Settings(model="Qwen/Qwen3-1.7B", batch_size=batch, max_length=seq, precision=precision, checkpointing=True,
                 chunk_size=chunk, devices=1, strategy="auto", accumulate=1, kahan_summation=None, cpu=not gpu,
                 fused_adamw=not precision.endswith("mixed"), choice=choice, in_backward=in_backward)
    return estimate_for(arch, s)["total_device"] / GIB


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
        pad_token_id, padding_side = 0, "right"

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
    peak, reserved = measure_peak(trainer.train)
    return {"s_per_step": timer.per_step(), "peak_bytes": peak, "reserved_bytes": reserved,
            "estimate_gib": float("nan"), "supervised_tokens_per_step": sum(r["num_supervised"] for r in rows[:4])}


def context_bytes() -> int:
    """Device memory the process holds before any tensor: the CUDA context (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny architecture (a CPU dry run of the script)")
    p.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run, the first 2 not timed")
    p.add_argument("--chunk", type=int, default=512, help="model.loss_chunk_size (configs/full.yaml's)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args()
    import medsft_lightning  # noqa: F401  (filters torchao's CPU-build log lines)

    gpu = torch.cuda.is_available()
    arch = TINY if args.tiny else QWEN3_1P7B
    context = context_bytes()
    model_dir = Path(args.out) / "qwen3-bench-model"
    n_params = write_model(model_dir, arch, torch.bfloat16 if gpu else torch.float32, "cuda" if gpu else "cpu")
    print(f"model: {n_params / 1e9:.3f}B params, seq {args.seq}, {args.steps} steps per run, device "
          f"{torch.cuda.get_device_name() if gpu else 'cpu (a dry run: no figure here means anything for a GPU)'}, "
          f"CUDA context {context / 2**30:.2f} GiB", flush=True)
    rows = make_rows(4 * (args.steps + 1), args.seq, args.prompt, arch["vocab_size"])
    fpt = flops_per_token(n_params, arch, args.seq)
    results, started = {}, time.perf_counter()
    for name in args.runs:
        try:
            r = run_seed(model_dir, rows, args.steps) if name == "seed" else run_medsft(
                model_dir, rows, name, args.steps, args.seq, args.chunk, arch["vocab_size"])
        except torch.OutOfMemoryError as err:
            print(f"{name}: out of memory ({str(err).splitlines()[0]})", flush=True)
            continue
        total_tokens = r["supervised_tokens_per_step"] / (args.seq - args.prompt) * args.seq
        r["supervised_tokens_per_s"] = r["supervised_tokens_per_step"] / r["s_per_step"]
        r["mfu"] = fpt * total_tokens / r["s_per_step"] / (args.peak_tflops * 1e12)
        r["device_gib"] = (r["reserved_bytes"] + context) / 2**30
        results[name] = r
        print(f"{name:14s} {r['supervised_tokens_per_s']:9.0f} sup tok/s  peak {r['peak_bytes'] / 2**30:6.2f} GiB  "
              f"reserved {r['reserved_bytes'] / 2**30:6.2f}  device {r['device_gib']:6.2f}  medsft memory "
              f"{r['estimate_gib']:6.2f}  MFU {100 * r['mfu']:5.1f}%  ({time.perf_counter() - started:.0f} s)",
              flush=True)
    seed = results.get("seed")
    if seed:
        for name, r in results.items():
            speed = r["supervised_tokens_per_s"] / seed["supervised_tokens_per_s"]
            memory = r["peak_bytes"] / max(1, seed["peak_bytes"])
            print(f"ratio vs seed  {name:14s} speed {speed:5.2f}x  memory {memory:5.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_qwen3_1p7b.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
