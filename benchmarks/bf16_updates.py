"""bf16 updates that vanish: each ``model.optimizer`` on bf16 weights vs fp32 master weights, in real training.

Two parts (``--part``): ``fidelity`` runs ``benchmarks/optimizer_fidelity.py`` (every choice against fp32 on the
same weights and gradients, >= 1,000 steps at lr 1e-5 and 1e-4: drift, both moments' ratios to fp32's, state
bytes per parameter, seconds per step); ``training`` (below) trains the tiny model with each choice.

At ``lr`` 1e-5 an AdamW update (~1e-5 per weight) is smaller than half the bf16 resolution of a weight near
0.02 (~6e-5), and RMSNorm weights sit at 1.0 (resolution 2^-8 below, 2^-7 above): under ``precision:
bf16-true`` with plain AdamW most updates round away. ``model.kahan_summation`` (default ``None``: on for
bf16 weights, ``medsft_lightning/training/optim.py``) keeps what rounding lost and adds it back. This trains the tiny
Qwen3 (``medsft:tiny-qwen3``: hidden 64, 2 layers, the real 151,936-token vocabulary, random init) from the
same init on the same rows in the same order with a real ``lightning.Trainer`` + ``MedSFTModule`` +
``MedicalDataModule("medsft:sample")`` (86 train / 10 val rows, truncated to ``--max_length`` so steps are
quick; batching ``pad``, batch ``--batch_size``, seed 42 for the shuffling and ``L.seed_everything``), at a
constant LR (``warmup_ratio`` 0, ``min_lr_ratio`` 1.0), weight decay 0.01 and clipping 1.0 as in
configs/full.yaml, no gradient checkpointing, ``loss_chunk_size`` 128, in these arms:

1. ``bf16-true-plain``: ``bf16-true``, ``optimizer=adamw``: plain AdamW on bf16 weights;
2. ``bf16-true-kahan``: ``bf16-true``, ``optimizer=kahan``: Kahan-compensated AdamW (torch-optimi);
3. ``bf16-true-8bit-sr``: ``bf16-true``, ``optimizer=adamw8bit_sr``: torchao's 8-bit moments, stochastic
   rounding (the default for bf16 weights; its step compiled, as on a GPU);
4. ``bf16-mixed``: fp32 master weights and AdamW states, bf16 autocast compute: the reference. Its AdamW is
   foreach, not fused: Lightning's AMP plugin refuses gradient clipping with a fused optimizer;
5. ``32-true``: fp32 everything: how far two fp32-weight runs differ (the noise floor of the comparison).

bf16-true loads the same fp32 checkpoint as bf16, so its initial weights are the bf16 rounding of the fp32
init. Each arm runs in its own subprocess (``L.seed_everything(42)`` before validating and before fitting;
no Trainer, autocast, RNG or allocator state of one arm is seen by the next); bf16-mixed runs first and
leaves its weight drift in a temporary file for the others to compare against. The validation loss is summed
here in Python floats: the module's logged ``val_loss`` is a bf16 ``MeanMetric`` under bf16-true (12.0 for
11.96).

Printed per arm: the loss curve (mean training loss of every epoch, the same rows in each), training loss at
step 0, mean training loss of the first and last 10 steps and of the first
and last complete epoch (the same rows, reshuffled), validation loss before and after training; the decrease
of the training loss (first minus last epoch) and of the validation loss as a share of bf16-mixed's (1.00 =
tracks fp32 master weights); the mean absolute change of the weights from their init as a share of
bf16-mixed's (all weights; RMSNorm weights) and the drift along bf16-mixed's drift (``sum(d * d_ref) /
sum(d_ref**2)``, 1.00 = the same move), for the Kahan arm also of weight + compensation; seconds per
optimizer step (after the first 3; validation excluded).

    python benchmarks/bf16_updates.py                     # both parts: ~25 min on 2 cores
    python benchmarks/bf16_updates.py --part training --steps 44 --arms bf16-mixed bf16-true-plain bf16-true-kahan
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT = "BF16_UPDATES_RESULT "  # prefix of the one JSON line a child prints
REFERENCE = "bf16-mixed"
ARMS = {  # name: (trainer.precision, model.optimizer); the reference first, the others compare with it
    "bf16-mixed": ("bf16-mixed", "adamw"),
    "bf16-true-plain": ("bf16-true", "adamw"),
    "bf16-true-kahan": ("bf16-true", "kahan"),
    "bf16-true-8bit-sr": ("bf16-true", "adamw8bit_sr"),
    "32-true": ("32-true", "adamw"),
}
TIMING_WARMUP = 3  # first optimizer steps left out of seconds per step


# -- one arm (children) --------------------------------------------------------------------------
def make_recorder():
    """A Callback: per-step training loss and step time, validation losses, the weights' init and drift."""
    import lightning as L
    import torch

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.epochs: list[int] = []
            self.step_s: list[float] = []
            self.val: list[tuple[int, float]] = []
            self.init: dict[str, torch.Tensor] = {}

        def on_fit_start(self, trainer, pl_module) -> None:
            self.init = {n: p.detach().float().clone() for n, p in pl_module.model.named_parameters()}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_s.append(time.perf_counter() - self.t0)
            self.losses.append(float(outputs["loss"]))
            self.epochs.append(trainer.current_epoch)

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            pl_module.val_tally = [0.0, 0]

        def on_validation_end(self, trainer, pl_module) -> None:
            loss_sum, tokens = pl_module.val_tally
            self.val.append((trainer.global_step, loss_sum / tokens))

        def drift(self, model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
            """Change from init of the stored weights and, under Kahan summation, of weight + compensation
            (the value the optimizer tracks; the bf16 weight is it rounded)."""
            stored = {n: p.detach().float() - self.init[n] for n, p in model.named_parameters()}
            comps = {n: optimizer.state.get(p, {}).get("kahan_comp") for n, p in model.named_parameters()}
            if not any(isinstance(c, torch.Tensor) and c.shape == stored[n].shape for n, c in comps.items()):
                return stored, None
            return stored, {n: d + comps[n].float() if isinstance(comps[n], torch.Tensor) else d
                            for n, d in stored.items()}

    return Recorder()


def drift_stats(drift: dict, ref: dict | None) -> dict:
    """Mean |drift| of all weights and of the RMSNorm weights; drift along ``ref``'s (when given)."""
    out = {}
    for part, names in (("all", list(drift)), ("norm", [n for n in drift if "norm" in n])):
        count = sum(drift[n].numel() for n in names)
        out[f"abs_{part}"] = sum(float(drift[n].abs().sum()) for n in names) / count
        if ref is not None:
            dot = sum(float((drift[n].double() * ref[n].double()).sum()) for n in names)
            out[f"along_{part}"] = dot / sum(float(ref[n].double().pow(2).sum()) for n in names)
    return out


def train_arm(cfg: dict) -> dict:
    """Validate, train ``cfg["steps"]`` optimizer steps, validate; losses, timings and the weight drift."""
    import lightning as L

    from medsft_lightning.data.datamodule import MedicalDataModule
    from medsft_lightning.training.module import MedSFTModule

    class TalliedModule(MedSFTModule):
        """Validation loss summed in Python floats: under bf16-true the logged ``val_loss`` is bf16-rounded."""

        def forward(self, batch):
            out = super().forward(batch)
            if not self.training:
                self.val_tally[0] += float(out[0])
                self.val_tally[1] += int(out[1])
            return out

    precision, choice = ARMS[cfg["arm"]]
    if choice == "adamw8bit_sr":  # torchao's compiled step, as on a GPU (eager it is ~15x slower on the CPU)
        from medsft_lightning.training.optim_lowbit import adamw8bit_sr_class

        adamw8bit_sr_class().compile_on_cpu = True
    dm = MedicalDataModule(dataset="medsft:sample", tokenizer=cfg["model"], max_length=cfg["max_length"],
                           batch_size=cfg["batch_size"], num_workers=0)
    # bf16-mixed: Lightning's AMP plugin refuses gradient clipping with a fused optimizer, so foreach AdamW there.
    module = TalliedModule(cfg["model"], learning_rate=cfg["lr"], weight_decay=0.01, warmup_ratio=0.0,
                           min_lr_ratio=1.0, gradient_checkpointing=False, loss_chunk_size=cfg["loss_chunk_size"],
                           optimizer=choice, fused_adamw=False if precision == "bf16-mixed" else None)
    rec = make_recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=cfg["steps"], max_epochs=-1,
                        gradient_clip_val=1.0, check_val_every_n_epoch=None, val_check_interval=cfg["val_every"],
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[rec], default_root_dir=cfg["workdir"])
    L.seed_everything(42, verbose=False)
    trainer.validate(module, datamodule=dm, verbose=False)  # step 0: the initial weights
    L.seed_everything(42, verbose=False)
    trainer.fit(module, datamodule=dm)
    if rec.val[-1][0] != trainer.global_step:
        trainer.validate(module, datamodule=dm, verbose=False)
    dtype = str(next(module.model.parameters()).dtype).removeprefix("torch.")
    return {"losses": rec.losses, "epochs": rec.epochs, "epoch_steps": int(trainer.num_training_batches),
            "step_s": rec.step_s, "val": rec.val, "optimizer": type(trainer.optimizers[0]).__name__,
            "weight_dtype": dtype}, *rec.drift(module.model, trainer.optimizers[0])


def child(cfg: dict) -> dict:
    """One arm, in this process; the reference arm saves its drift, the others compare theirs with it."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if cfg["arm"] == "prepare":  # build the tiny model and the encoded-row cache once, outside the timed runs
        from medsft_lightning.data.datamodule import MedicalDataModule
        from medsft_lightning.hub import TINY_MODEL, resolve_model

        model = resolve_model(TINY_MODEL)
        dm = MedicalDataModule(dataset="medsft:sample", tokenizer=model, max_length=cfg["max_length"])
        dm.setup("fit")
        return {**info, "model": model, "train_rows": len(dm.train_set.rows), "val_rows": len(dm.val_set.rows),
                "supervised": sum(r["num_supervised"] for r in dm.train_set.rows)}
    started = time.perf_counter()
    out, drift, effective = train_arm(cfg)
    ref_file = Path(cfg["workdir"]) / "reference_drift.pt"
    if cfg["arm"] == REFERENCE:
        torch.save(drift, ref_file)
    ref = torch.load(ref_file) if ref_file.is_file() else None
    if effective is not None:
        out["effective"] = drift_stats(effective, ref)
    return {**info, **out, **drift_stats(drift, ref), "wall_s": time.perf_counter() - started}


# -- orchestration (parent: standard library only) ------------------------------------------------
def spawn(cfg: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit code {proc.returncode}", "log_tail": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(lines[-1][len(RESULT) :])


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def epoch_means(r: dict) -> tuple[float, float]:
    """Mean training loss of the first and of the last complete epoch (every training row once in each)."""
    by_epoch: dict[int, list[float]] = {}
    for epoch, loss in zip(r["epochs"], r["losses"]):
        by_epoch.setdefault(epoch, []).append(loss)
    complete = [e for e, losses in by_epoch.items() if len(losses) == r["epoch_steps"]]
    if len(complete) < 2:
        return float("nan"), float("nan")
    return mean(by_epoch[complete[0]]), mean(by_epoch[complete[-1]])


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarise(r: dict, ref: dict | None) -> dict:
    """The table's figures of one arm (``ref``: the bf16-mixed arm's result, for the ratios)."""
    epoch_first, epoch_last = epoch_means(r)
    out = {"step0": r["losses"][0], "first10": mean(r["losses"][:10]), "last10": mean(r["losses"][-10:]),
           "epoch_first": epoch_first, "epoch_last": epoch_last, "val0": r["val"][0][1], "val_end": r["val"][-1][1],
           "train_drop": epoch_first - epoch_last, "val_drop": r["val"][0][1] - r["val"][-1][1],
           "s_step": mean(r["step_s"][TIMING_WARMUP:] or r["step_s"])}
    if ref is not None and "error" not in ref:
        base = summarise(ref, None)
        out["train_vs"] = ratio(out["train_drop"], base["train_drop"])
        out["val_vs"] = ratio(out["val_drop"], base["val_drop"])
        out["abs_all_vs"] = ratio(r["abs_all"], ref["abs_all"])
        out["abs_norm_vs"] = ratio(r["abs_norm"], ref["abs_norm"])
    return out


COLUMNS = ("arm", "optimizer", "loss@0", "first 10", "last 10", "epoch 1", "last ep", "val@0", "val end",
           "train drop", "val drop", "|dw| all", "|dw| norm", "along all", "along norm", "s/step")
NOTE = ("epoch 1 / last ep: mean training loss of the first / last complete epoch (the same rows, reshuffled). "
        "train drop = epoch 1 - last ep; val drop = val@0 - val end (the 10 val rows, summed in fp32); both, and "
        "|dw|, as a share of bf16-mixed's (1.00 = tracks fp32 master weights). |dw|: mean absolute change of the "
        "stored weights from their init (all weights; norm = RMSNorm weights). along: sum(d*d_ref)/sum(d_ref^2), "
        "d_ref = bf16-mixed's drift. w + comp: the same for the Kahan arm's weight + compensation (what its "
        "optimizer tracks; the stored bf16 weight is that rounded). s/step: optimizer steps after the first "
        f"{TIMING_WARMUP}, validation excluded.")


def epoch_curve(r: dict) -> list[float]:
    """Mean training loss of every complete epoch."""
    by_epoch: dict[int, list[float]] = {}
    for epoch, loss in zip(r["epochs"], r["losses"]):
        by_epoch.setdefault(epoch, []).append(loss)
    return [mean(v) for _, v in sorted(by_epoch.items()) if len(v) == r["epoch_steps"]]


def report(results: dict[str, dict], header: list[str]) -> None:
    print("\n".join(header))
    curves = {name: epoch_curve(r) for name, r in results.items() if "error" not in r}
    if curves:
        print("loss curves (mean training loss per epoch, the same rows each epoch):")
        print(f"{'epoch':>6} " + " ".join(f"{name:>18s}" for name in curves))
        for epoch in range(max(len(c) for c in curves.values())):
            print(f"{epoch + 1:>6} " + " ".join(f"{c[epoch]:18.4f}" if epoch < len(c) else f"{'':18s}"
                                                for c in curves.values()))
    print(f"{COLUMNS[0]:16s} {COLUMNS[1]:10s} " + " ".join(f"{c:>10s}" for c in COLUMNS[2:]))
    ref = results.get(REFERENCE)
    for name, r in results.items():
        if "error" in r:
            print(f"{name:16s} FAILED ({r['error']}):\n{r['log_tail']}")
            continue
        s = summarise(r, ref)
        losses = [s[k] for k in ("step0", "first10", "last10", "epoch_first", "epoch_last", "val0", "val_end")]
        shares = [s.get(k, float("nan")) for k in ("train_vs", "val_vs", "abs_all_vs", "abs_norm_vs")]
        shares += [r.get("along_all", float("nan")), r.get("along_norm", float("nan"))]
        print(f"{name:16s} {r['optimizer']:10s} " + " ".join(f"{x:10.4f}" for x in losses) + " "
              + " ".join(f"{x:10.3f}" for x in shares) + f" {s['s_step']:10.3f}")
        if "effective" in r and ref is not None and "error" not in ref:
            e = r["effective"]
            shares = [ratio(e["abs_all"], ref["abs_all"]), ratio(e["abs_norm"], ref["abs_norm"]),
                      e.get("along_all", float("nan")), e.get("along_norm", float("nan"))]
            print(f"{'  w + comp':16s} {'':10s} " + " ".join(f"{'':>10s}" for _ in range(9)) + " "
                  + " ".join(f"{x:10.3f}" for x in shares))
    if ref is not None and "error" not in ref:
        s = summarise(ref, None)
        print(f"{REFERENCE} absolute: train drop {s['train_drop']:.4f}, val drop {s['val_drop']:.4f}, "
              f"mean |dw| all {ref['abs_all']:.3e}, norm {ref['abs_norm']:.3e}")
    print(NOTE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["both", "fidelity", "training"], default="both",
                   help="fidelity: benchmarks/optimizer_fidelity.py (1,000 steps at lr 1e-5 and 1e-4); training: "
                        "the tiny model trained with each optimizer")
    p.add_argument("--steps", type=int, default=132, help="optimizer steps per arm (22 = one epoch at batch 4)")
    p.add_argument("--lr", type=float, default=1e-5, help="constant AdamW learning rate")
    p.add_argument("--max_length", type=int, default=88,
                   help="data.max_length: rows are truncated to it (88: every row keeps supervised tokens)")
    p.add_argument("--batch_size", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--val_every", type=int, default=None, help="validate every N steps (default: steps // 3)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms to run")
    p.add_argument("--loss_chunk_size", type=int, default=128, help="model.loss_chunk_size (configs/demo.yaml's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.part in ("both", "fidelity"):
        from benchmarks import optimizer_fidelity

        optimizer_fidelity.main([])
        if args.part == "fidelity":
            return
    import tempfile

    common = {k: getattr(args, k) for k in ("steps", "lr", "max_length", "batch_size", "loss_chunk_size", "threads")}
    common["val_every"] = args.val_every or max(1, args.steps // 3)
    started = time.perf_counter()
    prep = spawn({**common, "arm": "prepare"})
    if "error" in prep:
        raise SystemExit(f"preparing the tiny model and data failed ({prep['error']}):\n{prep['log_tail']}")
    arms = sorted(args.arms, key=list(ARMS).index)  # the reference (bf16-mixed) first
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for arm in arms:
            print(f"running: {arm} ...", file=sys.stderr, flush=True)
            results[arm] = spawn({**common, "arm": arm, "model": prep["model"], "workdir": workdir})
    header = [f"bf16_updates: {datetime.datetime.now().isoformat(timespec='seconds')}, torch {prep['torch']}, "
              f"{prep['threads']} threads, {os.cpu_count()} logical CPUs, total {time.perf_counter() - started:.0f} s",
              f"tiny Qwen3 {prep['model']}, medsft:sample {prep['train_rows']} train / {prep['val_rows']} val rows "
              f"({prep['supervised']} supervised train tokens), max_length {args.max_length}, batch "
              f"{args.batch_size}, {args.steps} steps, AdamW lr {args.lr} constant, wd 0.01, clip 1.0, seed 42"]
    report(results, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
