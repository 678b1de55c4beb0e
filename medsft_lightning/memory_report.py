"""``medsft memory``'s settings (LightningCLI YAML + flags) and its printed report."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from medsft_lightning.memory import (
    GIB,
    Arch,
    EstimateError,
    estimate,
    layer_activation_bytes,
    precision_of,
    resolve_arch,
)

# flag: (kind, default). Defaults are those of MedSFTModule, MedicalDataModule and Trainer (a test checks).
FIELDS: dict[str, tuple[str, object]] = {
    "model.model_name_or_path": ("str", "medsft:tiny-qwen3"),
    "model.gradient_checkpointing": ("bool", True),
    "model.loss_chunk_size": ("int", 1024),
    "model.fused_adamw": ("bool?", None),
    "data.batch_size": ("int", 4),
    "data.max_length": ("int", 2048),
    "trainer.precision": ("str", "32-true"),
    "trainer.devices": ("devices", "auto"),
    "trainer.accumulate_grad_batches": ("int", 1),
    "trainer.strategy": ("str", "auto"),
    "trainer.accelerator": ("str", "auto"),
}
ALIASES = {"--model": "model.model_name_or_path", "--strategy": "trainer.strategy", "--devices": "trainer.devices"}
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


@dataclass(frozen=True)
class Settings:
    model: str
    batch_size: int
    max_length: int
    precision: str
    checkpointing: bool
    chunk_size: int
    devices: int
    strategy: str
    accumulate: int
    fused_adamw: bool


def _convert(kind: str, value, origin: str):
    text = str(value).strip().lower()
    if kind == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or text.isdigit()) or int(value) < 1:
            raise EstimateError(f"{origin}={value!r}: use a positive integer")
        return int(value)
    if kind in ("bool", "bool?"):
        if isinstance(value, bool):
            return value
        if kind == "bool?" and (value is None or text in ("null", "none")):
            return None
        if text not in _TRUE | _FALSE:
            raise EstimateError(f"{origin}={value!r}: use true or false")
        return text in _TRUE
    if kind == "devices":  # None: not known before the run ("auto", -1)
        if isinstance(value, list):
            return len(value) or None
        parts = [p for p in text.split(",") if p.strip()]
        if text in ("auto", "-1"):
            return None
        if len(parts) > 1:
            return len(parts)
        return _convert("int", value, origin)
    if isinstance(value, dict):  # class_path form, e.g. of trainer.strategy
        return str(value.get("class_path", ""))
    return str(value)


def _from_config(path: str) -> dict[str, tuple[object, str]]:
    import yaml

    file = Path(path)
    try:
        cfg = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise EstimateError(f"--config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise EstimateError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(cfg, dict):
        raise EstimateError(f"{path}: expected a mapping of sections (model, data, trainer)")
    found = {}
    for field in FIELDS:
        section, key = field.split(".")
        block = cfg.get(section)
        if isinstance(block, dict) and key in block:
            found[field] = (block[key], f"{path}: {field}")
    return found


def _strategy(name: str, origin: str) -> str:
    low = name.lower()
    if "fsdp" in low:
        return "fsdp"
    if "ddp" in low:
        return "ddp"
    if low in ("auto", "single_device", ""):
        return "auto"
    raise EstimateError(f"{origin}={name!r}: not estimated; use auto, ddp or fsdp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise EstimateError(f"{message} (see medsft memory --help)")


def parse(argv: list[str]) -> tuple[Settings, list[str]]:
    """Settings from ``--config`` files (later ones win) and flags (win over files); notes on assumptions."""
    parser = _Parser(prog="medsft memory", allow_abbrev=False,
                     description="Estimate one device's training memory for a medsft config (nothing is loaded).")
    parser.add_argument("--config", action="append", default=[], help="a medsft fit YAML (repeatable)")
    for field, (kind, default) in FIELDS.items():
        metavar = {"int": "INT", "bool": "BOOL", "bool?": "BOOL|null", "devices": "N"}.get(kind, "VALUE")
        parser.add_argument(f"--{field}", dest=field, default=None, metavar=metavar,
                            help=f"overrides the config; default {default!r}")
    for flag, field in ALIASES.items():
        parser.add_argument(flag, dest=field, default=None, metavar="VALUE", help=f"same as --{field}")
    args = vars(parser.parse_args(argv))
    raw = {field: (default, "default") for field, (_, default) in FIELDS.items()}
    for path in args.pop("config"):
        raw.update(_from_config(path))
    raw.update({field: (value, f"--{field}") for field, value in args.items() if value is not None})
    val = {field: _convert(FIELDS[field][0], value, origin) for field, (value, origin) in raw.items()}
    precision_of(val["trainer.precision"])  # fails early on an unknown precision
    notes = []
    devices = val["trainer.devices"]
    if devices is None:
        notes.append(f"trainer.devices={raw['trainer.devices'][0]!r}: assumed 1 device (pass --devices N)")
        devices = 1
    fused = val["model.fused_adamw"]
    if fused is None:  # MedSFTModule: fused exactly when training on CUDA
        fused = str(val["trainer.accelerator"]).lower() != "cpu"
    settings = Settings(
        model=val["model.model_name_or_path"], batch_size=val["data.batch_size"], max_length=val["data.max_length"],
        precision=str(val["trainer.precision"]), checkpointing=val["model.gradient_checkpointing"],
        chunk_size=val["model.loss_chunk_size"], devices=devices,
        strategy=_strategy(val["trainer.strategy"], raw["trainer.strategy"][1]),
        accumulate=val["trainer.accumulate_grad_batches"], fused_adamw=fused,
    )
    return settings, notes


def estimate_for(arch: Arch, s: Settings) -> dict:
    """``estimate`` for these settings."""
    return estimate(arch, s.batch_size, s.max_length, s.precision, s.checkpointing, s.chunk_size,
                    s.devices, s.strategy, s.fused_adamw)


def _hints(arch: Arch, s: Settings, total: int) -> list[str]:
    flip = replace(s, checkpointing=not s.checkpointing)
    alt = [(f"gradient checkpointing {'off' if s.checkpointing else 'on'}", flip,
            "~20-30% faster steps" if s.checkpointing else "~20-30% slower steps")]
    if s.chunk_size > 128:
        alt.append((f"loss_chunk_size {s.chunk_size // 2}", replace(s, chunk_size=s.chunk_size // 2),
                    "more, smaller LM-head GEMMs"))
    if s.batch_size > 1:
        alt.append((f"batch_size {s.batch_size // 2}", replace(s, batch_size=s.batch_size // 2),
                    f"accumulate_grad_batches {s.accumulate * 2} keeps the rows per step"))
    if s.max_length >= 32:
        alt.append((f"max_length {s.max_length // 2}", replace(s, max_length=s.max_length // 2),
                    "longer rows lose their end"))
    other = {"bf16-true": "bf16-mixed", "bf16-mixed": "bf16-true", "16-true": "16-mixed", "16-mixed": "16-true"}
    if s.precision in other:
        alt.append((other[s.precision], replace(s, precision=other[s.precision]),
                    "fp32 weights and AdamW states" if s.precision.endswith("true") else "bf16 weights and states"))
    if not s.fused_adamw:
        alt.append(("fused_adamw true", replace(s, fused_adamw=True), "CUDA only"))
    deltas = [(name, (estimate_for(arch, alt_s)["total"] - total) / GIB, why) for name, alt_s, why in alt]
    return [f"  {name:<40}{delta:+8.2f} GiB  {why}" for name, delta, why in deltas if round(delta, 2)]


def report(arch: Arch, s: Settings, notes: list[str] | None = None) -> str:
    """The printed table."""
    est, pr = estimate_for(arch, s), precision_of(s.precision)
    n, layers, tokens, v = est["params"], arch.num_hidden_layers, est["tokens"], arch.vocab_size
    per_layer = layer_activation_bytes(arch, s.precision, s.max_length)
    on_off = "on" if s.checkpointing else "off"
    shard = f" / {s.devices} devices" if est["strategy"] == "fsdp" and s.devices > 1 else ""
    size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    stored = f"; tied LM head counted once, checkpoint files hold {est['params_stored']:,}"
    stored = stored if arch.tie_word_embeddings else ""

    def row(label: str, key: str, how: str, shown: bool = True, indent: bool = False) -> list[str]:
        if not shown:
            return []
        value = f"({est[key] / GIB:.2f})" if indent else f"{est[key] / GIB:.2f}"
        return [f"{'  ' * indent}{label:<{40 - 2 * indent}}{value:>8}  {how}"]

    ckpt = f"{layers} layer inputs × {pr.resid} B × hidden + 1 layer recomputed + final norm"
    full = f"{layers} layers × {per_layer:,} B/token + final norm"
    lines = [
        f"medsft memory: estimate for one device; {arch.source}",
        f"  {s.precision} · micro-batch {s.batch_size} × {s.max_length:,} = {tokens:,} tokens · gradient checkpointing "
        f"{on_off} · loss chunk {s.chunk_size:,}",
        f"  {s.devices} device{'s' if s.devices > 1 else ''}, strategy {est['strategy']} · accumulate {s.accumulate} "
        f"({s.batch_size * s.accumulate * s.devices} rows per optimizer step) · "
        f"AdamW {'fused' if s.fused_adamw else 'foreach'}",
        *[f"  note: {note}" for note in notes or []],
        "",
        f"parameters {n:,} ({size}{stored})",
        "",
        f"{'':40}{'GiB':>8}  how",
        *row("weights", "weights", f"{pr.param} B/param{shard}"),
        *row("autocast bf16 weight copies", "autocast_copies", f"{pr.autocast} B/param", est["autocast_copies"] > 0),
        *row("gradients", "gradients", f"{pr.param} B/param{shard}"),
        *row("DDP gradient buckets", "ddp_buckets", "a second gradient copy", est["ddp_buckets"] > 0),
        *row("FSDP gathered weights + gradients", "fsdp_gathered", "embedding + 2 decoder layers unsharded",
             est["fsdp_gathered"] > 0),
        *row("AdamW states", "optimizer", f"2 moments × {pr.param} B/param{shard}"),
        *row(f"activations, checkpointing {on_off}", "activations", ckpt if s.checkpointing else full),
        *row(f"checkpointing {'off' if s.checkpointing else 'on'}",
             "activations_full" if s.checkpointing else "activations_checkpointed",
             "not counted: " + (full if s.checkpointing else ckpt), indent=True),
        *row("loss, chunked", "loss_chunked", f"{s.chunk_size:,} × {v:,} fp32 logits + fp32 LM-head gradient"),
        *row("seed-style full logits", "loss_full", f"not counted: {tokens:,} × {v:,} × {pr.act + 8} B", indent=True),
        *row("foreach AdamW step temporary", "optimizer_step_temp", "counted if above activations + loss",
             est["optimizer_step_temp"] > 0),
        f"{'total':<40}{est['total'] / GIB:>8.2f}  GiB per device",
        "",
        "What a knob would change (GiB of the total):",
        *_hints(arch, s, est["total"]),
        "",
        "An estimate, not a promise: everything above counted as alive at once, rows padded to max_length.",
        "Not counted: the CUDA context (~0.5 GiB), allocator fragmentation, backward's temporary buffers;",
        "measured H200 peaks were 2-5% above it. Formulas and checks: medsft_lightning/memory.py.",
    ]
    return "\n".join(lines)


def run(argv: list[str]) -> str:
    """Parse ``argv``, resolve the architecture and return the report."""
    settings, notes = parse(argv)
    return report(resolve_arch(settings.model), settings, notes)
