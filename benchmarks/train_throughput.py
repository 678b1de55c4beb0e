"""Training throughput and memory on CPU: medsft's step per batching mode vs the seed recipe.

Tiny Qwen3 (hidden 64, 2 layers, the real 151,936-token vocabulary; ``medsft:tiny-qwen3``) on the packaged
sample (96 rows; the DataModule's 86 train / 10 validation split), fp32, one epoch, AdamW at one constant
learning rate (weight decay 0, gradient clipping 1.0, seed 42) on both sides.

- Seed recipe, as in the tutorial medsft replaces: HF ``Trainer``, batch 1 x accumulation 4, gradient
  checkpointing, right padding by ``DataCollatorForSeq2Seq``, full logits (the model's own ``labels=``
  loss), rows from its ``process_func`` (hand-written chat markup; prompt and ``<think>..</think>\\n answer``
  tokenised apart; pad id appended and supervised; truncated to ``max_length``).
- medsft: the real ``lightning.Trainer`` + ``MedSFTModule`` + ``MedicalDataModule(batching=mode)``, batch
  ``--batch_size`` x accumulation 1 (``pack``: ``--pack_batch_size`` sequences of ``max_length``), with and
  without gradient checkpointing.

Measured per configuration, each in its own subprocess (so its peak RSS is its own):

- supervised tokens/s: supervised tokens of the optimizer steps after the first ``--warmup_steps``, over
  the wall-clock time from the end of step ``warmup_steps`` to the end of the last step (data loading and
  framework overhead between steps included, on both sides).
- peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, read right after training) and the training increment:
  peak RSS minus the RSS just before the first training step (model, data and libraries loaded). The
  absolute figure includes ~0.5-1 GB of imported libraries (torch, transformers, lightning, datasets)
  common to both sides; the memory ratio uses the increment.
- mean training loss over the epoch (token-weighted) and, after the epoch, the validation loss on the 10
  validation rows: both sides by the same function (full logits, summed cross-entropy / supervised tokens),
  each on its own encoding of those rows. These show the speed is not bought with worse training; medsft's
  ``pack`` takes fewer, larger optimizer steps, so at one learning rate its losses after one epoch differ.

    python benchmarks/train_throughput.py                              # everything (~10 min on 2 cores)
    python benchmarks/train_throughput.py --modes pad --checkpointing on --max_steps 3 --warmup_steps 1  # ~1 min

The seed side needs ``accelerate`` (HF ``Trainer`` requires it): ``pip install accelerate``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT = "TRAIN_THROUGHPUT_RESULT "  # prefix of the one JSON line a child prints
SEED_NAME = "seed recipe (HF Trainer 1x4, ckpt, full logits)"


# -- measuring (children) ----------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Meter:
    """Per-step timestamps and supervised tokens, token-weighted training loss, RSS before step 1."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.step_tokens: list[int] = []
        self.pending = self.loss_tokens = self.input_tokens = self.real_tokens = 0
        self.loss_sum = 0.0
        self.rss_before: int | None = None

    def before_first_step(self) -> None:
        if self.rss_before is None:
            self.rss_before = rss_bytes()
            self.t0 = time.perf_counter()  # the first step's time runs from here

    def micro_batch(self, loss_sum: float, supervised: int, input_ids, attention_mask) -> None:
        self.loss_sum += loss_sum
        self.loss_tokens += supervised
        self.pending += supervised
        self.input_tokens += int(input_ids.numel())
        self.real_tokens += int(attention_mask.sum())

    def step_end(self) -> None:
        self.stamps.append(time.perf_counter())
        self.step_tokens.append(self.pending)
        self.pending = 0

    def summary(self, warmup: int) -> dict:
        if len(self.stamps) <= warmup:
            raise SystemExit(f"only {len(self.stamps)} optimizer steps ran, all within --warmup_steps {warmup}: "
                             "raise --max_steps or lower --warmup_steps")
        start = self.stamps[warmup - 1] if warmup > 0 else self.t0
        seconds, tokens = self.stamps[-1] - start, sum(self.step_tokens[warmup:])
        return {"steps": len(self.stamps), "timed_steps": len(self.stamps) - warmup, "timed_s": seconds,
                "timed_supervised_tokens": tokens, "supervised_tokens_per_s": tokens / seconds,
                "supervised_tokens": self.loss_tokens, "train_loss": self.loss_sum / max(1, self.loss_tokens),
                "pad_share": 1 - self.real_tokens / max(1, self.input_tokens), "rss_before_bytes": self.rss_before,
                "step_s": [b - a for a, b in zip([self.t0, *self.stamps], self.stamps)],
                "step_supervised_tokens": self.step_tokens}


def val_loss(model, rows: list[dict]) -> float:
    """Summed next-token cross-entropy over every supervised token of ``rows`` / their count (batch 1)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0, :-1]
            target = torch.tensor(row["labels"][1:])
            total += F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def seed_process_func(example: dict, tokenizer, max_length: int, system_prompt: str) -> dict:
    """The seed tutorial's ``process_func``: hand-written chat markup, prompt and response tokenised apart."""
    instruction = tokenizer(f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"
                            f"{example['question']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    response = tokenizer(f"<think>{example['think']}</think>\n{example['answer']}", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    if len(input_ids) > max_length:
        input_ids, attention_mask, labels = input_ids[:max_length], attention_mask[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def data_module(cfg: dict, batching: str = "pad"):
    """The DataModule both sides take their rows from (``batching`` passed only when not ``pad``)."""
    from medsft_lightning.data.datamodule import MedicalDataModule

    extra = {} if batching == "pad" else {"batching": batching}
    batch_size = cfg["pack_batch_size"] if batching == "pack" else cfg["batch_size"]
    return MedicalDataModule(dataset="medsft:sample", tokenizer=cfg["model"], max_length=cfg["max_length"],
                             batch_size=batch_size, **extra)


def run_seed(cfg: dict, meter: Meter) -> tuple[object, list[dict]]:
    """Train with the seed recipe; return the trained model and its encoding of the validation rows."""
    import importlib.util
    from functools import partial

    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT

    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit("the seed recipe's HF Trainer needs accelerate: pip install accelerate")
    dm = data_module(cfg)
    dm.setup("fit")
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    encode = partial(seed_process_func, tokenizer=tokenizer, max_length=cfg["max_length"],
                     system_prompt=DEFAULT_SYSTEM_PROMPT)
    train = datasets.Dataset.from_list(dm.train_rows.rows).map(encode, remove_columns=["question", "think", "answer"])
    val = [encode(r) for r in dm.val_rows.rows]
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    model.enable_input_require_grads()

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter.before_first_step()

        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

    class MeasuredTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            n = int(inputs["labels"][:, 1:].ne(-100).sum())
            value = (loss[0] if return_outputs else loss).detach()
            meter.micro_batch(float(value) * float(num_items_in_batch if num_items_in_batch is not None else n), n,
                              inputs["input_ids"], inputs["attention_mask"])
            return loss

    args = TrainingArguments(
        output_dir=cfg["workdir"], per_device_train_batch_size=1, gradient_accumulation_steps=4, num_train_epochs=1,
        max_steps=cfg["max_steps"] or -1, learning_rate=cfg["learning_rate"], lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=True, logging_steps=10**6, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=42, dataloader_num_workers=0, disable_tqdm=True)
    trainer = MeasuredTrainer(model=model, args=args, train_dataset=train, callbacks=[Timing()],
                              data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True))
    trainer.train()
    return model, val


def run_medsft(cfg: dict, meter: Meter) -> tuple[object, list[dict]]:
    """Train with lightning.Trainer + MedSFTModule + MedicalDataModule; return the model and the val rows."""
    import lightning as L

    from medsft_lightning.training.module import MedSFTModule

    class MeasuredModule(MedSFTModule):
        def forward(self, batch):
            out = super().forward(batch)
            if self.training:
                meter.micro_batch(float(out[0].detach()), int(out[1]), batch["input_ids"], batch["attention_mask"])
            return out

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            meter.before_first_step()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.step_end()  # accumulate_grad_batches is 1: every micro-batch is an optimizer step

    dm = data_module(cfg, cfg["mode"])
    lora = None
    if cfg.get("lora"):
        from medsft_lightning.training.lora import LoraSettings

        lora = LoraSettings()
    module = MeasuredModule(model_name_or_path=cfg["model"], gradient_checkpointing=cfg["ckpt"], lora=lora,
                            learning_rate=cfg["learning_rate"], weight_decay=0.0, warmup_ratio=0.0, min_lr_ratio=1.0,
                            loss_chunk_size=cfg["loss_chunk_size"])
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1,
                        max_steps=cfg["max_steps"] or -1, accumulate_grad_batches=1, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[Timing()], default_root_dir=cfg["workdir"])
    trainer.fit(module, datamodule=dm)
    return module.model, dm.val_set.rows


def child(cfg: dict) -> dict:
    """One configuration, in this process: train, read the peak RSS, then the validation loss."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if cfg["side"] == "prepare":  # build the tiny model and the encoded-row cache once, outside the measured runs
        from medsft_lightning.hub import TINY_MODEL, resolve_model

        cfg["model"] = resolve_model(TINY_MODEL)
        dm = data_module(cfg)
        dm.setup("fit")
        return {**info, "model": cfg["model"], "train_rows": len(dm.train_set.rows), "val_rows": len(dm.val_set.rows)}
    torch.manual_seed(42)
    meter = Meter()
    model, val_rows = (run_seed if cfg["side"] == "seed" else run_medsft)(cfg, meter)
    peak = peak_rss_bytes()  # before the validation pass, whose full logits are not part of training
    out = {**info, **meter.summary(cfg["warmup_steps"]), "peak_rss_bytes": peak}
    out["train_rss_increment_bytes"] = peak - out["rss_before_bytes"]
    out["val_loss"] = val_loss(model, val_rows)
    return out


# -- orchestration (parent: standard library only, so children inherit no large peak RSS) ----------
def spawn(cfg: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"error": f"exit code {proc.returncode}", "log_tail": tail}
    return json.loads(lines[-1][len(RESULT) :])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plans(args) -> list[tuple[str, dict]]:
    out = [(SEED_NAME, {"side": "seed"})]
    for mode in args.modes:
        shape = f"{args.pack_batch_size} seq x {args.max_length}" if mode == "pack" else f"{args.batch_size}x1"
        for ckpt in args.checkpointing:
            out.append((f"medsft {mode} {shape}, ckpt {ckpt}", {"side": "medsft", "mode": mode, "ckpt": ckpt == "on"}))
    if args.lora:  # the seed's LoRA settings vs full fine-tuning, same batching (the first mode)
        mode = args.modes[0]
        out.append((f"medsft {mode} {args.batch_size}x1 LoRA r8, ckpt off",
                    {"side": "medsft", "mode": mode, "ckpt": False, "lora": True}))
    return out


def report(results: dict[str, dict], header: list[str]) -> None:
    gib = 2**30
    print("\n".join(header))
    print(f"{'configuration':48s} {'steps':>5s} {'pad':>4s} {'sup tok/s':>9s} {'vs seed':>7s} {'peak RSS':>8s} "
          f"{'train +RSS':>10s} {'vs seed':>7s} {'train loss':>10s} {'val loss':>8s}")
    seed = results.get(SEED_NAME, {})
    for name, r in results.items():
        if "error" in r:
            print(f"{name:48s} FAILED ({r['error']}):\n{r['log_tail']}")
            continue
        speed = r["supervised_tokens_per_s"] / seed["supervised_tokens_per_s"] if "steps" in seed else float("nan")
        mem = r["train_rss_increment_bytes"] / seed["train_rss_increment_bytes"] if "steps" in seed else float("nan")
        print(f"{name:48s} {r['steps']:5d} {100 * r['pad_share']:3.0f}% {r['supervised_tokens_per_s']:9.0f} "
              f"{speed:6.2f}x {r['peak_rss_bytes'] / gib:6.2f} G {r['train_rss_increment_bytes'] / gib:8.2f} G "
              f"{mem:6.2f}x {r['train_loss']:10.4f} {r['val_loss']:8.4f}")
    print("sup tok/s: supervised tokens of the steps after the warm-up / their wall-clock seconds. peak RSS: "
          "absolute, includes ~0.5-1 GB of libraries common to both sides; train +RSS: peak minus the RSS just "
          "before the first step (its ratio is the memory ratio). pad: share of padding in the batches. "
          "Losses: token means (val: after the epoch, 10 rows, each side's own encoding).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["pad", "group_by_length", "pack"],
                   choices=["pad", "group_by_length", "pack"], help="medsft batching modes to run")
    p.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="medsft gradient checkpointing settings to run (the seed recipe always has it on)")
    p.add_argument("--batch_size", type=int, default=4, help="medsft rows per optimizer step (pad, group_by_length)")
    p.add_argument("--pack_batch_size", type=int, default=1, help="packed sequences per optimizer step (pack)")
    p.add_argument("--max_length", type=int, default=2048, help="the seed's MAX_LENGTH, same on both sides")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="constant AdamW learning rate, both sides")
    p.add_argument("--warmup_steps", type=int, default=2, help="first optimizer steps left out of the timing")
    p.add_argument("--max_steps", type=int, default=None, help="cap optimizer steps (quick checks; default 1 epoch)")
    p.add_argument("--loss_chunk_size", type=int, default=128,
                   help="medsft's model.loss_chunk_size (configs/demo.yaml's CPU value; 1,024 is the GPU default)")
    p.add_argument("--lora", action="store_true",
                   help="also run LoRA (r 8, alpha 32, all projections; needs peft) on the first mode, ckpt off")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        return
    import tempfile

    common = {k: getattr(args, k) for k in ("batch_size", "pack_batch_size", "max_length", "learning_rate",
                                            "warmup_steps", "max_steps", "threads", "loss_chunk_size")}
    prep = spawn({**common, "side": "prepare", "model": None})
    if "error" in prep:
        raise SystemExit(f"preparing the tiny model and data failed ({prep['error']}):\n{prep['log_tail']}")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, plan in plans(args):
            print(f"running: {name} ...", file=sys.stderr, flush=True)
            results[name] = spawn({**common, **plan, "model": prep["model"], "workdir": workdir})
    header = [f"train_throughput: {datetime.datetime.now().isoformat(timespec='seconds')}, torch {prep['torch']}, "
              f"{prep['threads']} threads, {cpu_model()} ({os.cpu_count()} logical CPUs)",
              f"tiny Qwen3 {prep['model']}, medsft:sample {prep['train_rows']} train / {prep['val_rows']} val rows, "
              f"max_length {args.max_length}, fp32, AdamW lr {args.learning_rate} constant, 1 epoch"
              + (f" capped at {args.max_steps} steps" if args.max_steps else "")
              + {0: ", every step timed", 1: ", optimizer step 1 not timed"}.get(
                  args.warmup_steps, f", optimizer steps 1-{args.warmup_steps} not timed")]
    report(results, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
