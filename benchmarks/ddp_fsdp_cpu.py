"""1 process vs 2-process DDP vs 2-process FSDP2 (ModelParallelStrategy) on CPU, same global batch.

Tiny Qwen3 (hidden 64, 2 layers, the real 151,936-token vocabulary, tied LM head; ``medsft:tiny-qwen3``) on
the packaged sample (86 train / 10 validation rows), fp32, configs/demo.yaml's model and data settings, one
epoch, global batch ``--batch_size`` rows per optimizer step (1 process: batch_size x 1; 2 processes:
batch_size / 2 each). Each configuration is one real ``medsft fit`` run in its own subprocess (2-process runs
launch their second rank themselves, gloo), with the 2 ranks given ``--cores / 2`` threads each and the single
process all ``--cores``. No checkpoints, samples or export: only training and the validation after it.

Measured by a callback on every rank:

- supervised tokens/s: supervised tokens of all ranks in the optimizer steps after the first
  ``--warmup_steps``, over the wall-clock time of those steps (the slowest rank's);
- peak RSS of each process (``ru_maxrss``) and its training increment: peak minus the RSS just before the
  first step (the absolute figure includes ~0.5-1 GB of libraries, the same for every configuration);
- the final validation loss (token mean over the 10 validation rows, all ranks): the same training gives
  the same loss.

    python benchmarks/ddp_fsdp_cpu.py                  # all three, ~2 min on 2 cores
    python benchmarks/ddp_fsdp_cpu.py --runs fsdp2     # one of them
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import yaml

REPO = Path(__file__).resolve().parents[1]
MEDSFT = str(Path(sys.executable).parent / "medsft")
RUNS = {
    "1 process": [],
    "DDP, 2 processes": ["--trainer.strategy", "ddp", "--trainer.devices", "2"],
    "FSDP2, 2 processes": ["--trainer.strategy", "ModelParallelStrategy", "--trainer.strategy.data_parallel_size",
                           "2", "--trainer.strategy.tensor_parallel_size", "1", "--trainer.devices", "2"],
}
KEYS = {"1": "1 process", "ddp": "DDP, 2 processes", "fsdp2": "FSDP2, 2 processes"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StepMeter(L.Callback):
    """Per rank: a timestamp and the supervised tokens of every optimizer step (accumulation 1), the RSS before
    the first step and the peak RSS after training; one JSON line per rank appended to ``out``.

    Args:
        out: JSON-lines file the ranks append their measurements to.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.rss_before = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self.stamps:
            self.rss_before, self.t0 = rss_bytes(), time.perf_counter()
        self.tokens.append(int((batch["labels"][:, 1:] != -100).sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.stamps.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module) -> None:
        line = {"rank": trainer.global_rank, "t0": self.t0, "stamps": self.stamps, "tokens": self.tokens,
                "rss_before": self.rss_before, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "val_loss": float(trainer.callback_metrics["val_loss"])}
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def write_config(work: Path, args, out: Path) -> Path:
    """configs/demo.yaml for one epoch, validation at its end only, no checkpoints/samples/export."""
    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, val_check_interval=1.0, enable_checkpointing=False, enable_progress_bar=False,
                          callbacks=[{"class_path": "ddp_fsdp_cpu.StepMeter", "init_args": {"out": str(out)}}],
                          logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(work / "runs"), "name": "bench"}}])
    cfg["model"]["gradient_checkpointing"] = args.checkpointing
    cfg["samples"] = {"num_samples": 1, "generation": {"max_new_tokens": 1}}  # 1 token: costs nothing measurable
    cfg["gen_metrics"] = {"num_rows": 0}
    cfg.update(export=False, baseline_validation=False)
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def run(name: str, args, work: Path) -> dict:
    """One ``medsft fit`` in a subprocess; the ranks' measurements combined."""
    work.mkdir(parents=True)
    out = work / "meter.jsonl"
    processes = 1 if name == "1 process" else 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)]),
           "OMP_NUM_THREADS": str(max(1, args.cores // processes)), "SWANLAB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [MEDSFT, "fit", "--config", str(write_config(work, args, out)),
           "--data.batch_size", str(args.batch_size // processes), *RUNS[name]]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ranks = [json.loads(line) for line in out.read_text().splitlines()]
    w = args.warmup_steps
    seconds = max(r["stamps"][-1] - r["stamps"][w - 1] for r in ranks)
    return {"steps": len(ranks[0]["stamps"]), "tokens_per_s": sum(sum(r["tokens"][w:]) for r in ranks) / seconds,
            "peak_rss": [r["peak_rss"] for r in sorted(ranks, key=lambda r: r["rank"])],
            "train_rss": [r["peak_rss"] - r["rss_before"] for r in sorted(ranks, key=lambda r: r["rank"])],
            "val_loss": ranks[0]["val_loss"], "supervised_tokens": sum(sum(r["tokens"]) for r in ranks)}


def report(results: dict[str, dict], args) -> None:
    gib = 2**30
    base = results.get("1 process") or next(iter(results.values()))  # ratios against 1 process if it ran

    def mem(values: list[int]) -> str:
        return " / ".join(f"{v / gib:.2f}" for v in values) + " G"

    print(f"tiny Qwen3, medsft:sample, 1 epoch, global batch {args.batch_size}, {args.cores} cores, gradient "
          f"checkpointing {'on' if args.checkpointing else 'off'}, timing after {args.warmup_steps} warm-up steps")
    print(f"{'run':20s} {'steps':>5s} {'sup tok/s':>9s} {'ratio':>6s} {'peak RSS/process':>18s} {'ratio':>6s} "
          f"{'train +RSS/process':>19s} {'ratio':>6s} {'val loss':>10s} {'diff':>9s}")
    for name, r in results.items():
        speed = r["tokens_per_s"] / base["tokens_per_s"]
        peak, train = max(r["peak_rss"]) / max(base["peak_rss"]), max(r["train_rss"]) / max(base["train_rss"])
        print(f"{name:20s} {r['steps']:5d} {r['tokens_per_s']:9.0f} {speed:5.2f}x {mem(r['peak_rss']):>18s} "
              f"{peak:5.2f}x {mem(r['train_rss']):>19s} {train:5.2f}x {r['val_loss']:10.6f} "
              f"{r['val_loss'] - base['val_loss']:+9.1e}")
    print("sup tok/s: supervised tokens of all ranks in the timed steps / the slowest rank's seconds. RSS per "
          "process (rank 0 / rank 1); ratios use the larger one. train +RSS: peak minus RSS before the first step.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=list(KEYS), choices=list(KEYS), help="which configurations")
    p.add_argument("--batch_size", type=int, default=4, help="global rows per optimizer step (even)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores shared by each run's processes")
    p.add_argument("--warmup_steps", type=int, default=2, help="first optimizer steps left out of the timing")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (demo: off)")
    args = p.parse_args()
    if args.batch_size % 2 or args.warmup_steps < 1:
        raise SystemExit(f"--batch_size={args.batch_size} must be even and --warmup_steps={args.warmup_steps} >= 1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ddp_fsdp_cpu-") as tmp:
        for key in args.runs:
            print(f"running: {KEYS[key]} ...", file=sys.stderr, flush=True)
            results[KEYS[key]] = run(KEYS[key], args, Path(tmp) / key)
    report(results, args)


if __name__ == "__main__":
    main()
