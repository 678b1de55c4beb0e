"""``medsft memory``'s settings: LightningCLI YAML + flags, and the ``--model`` architecture (never downloaded)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from medsft_lightning.tools.memory import (
    _PRECISION_ALIASES,
    QWEN3_ARCHS,
    Arch,
    EstimateError,
    arch_from_config,
    precision_of,
)
from medsft_lightning.tools.memory_optim import parse_size
from medsft_lightning.training.optim_choice import resolve, weights_of

# flag: (kind, default). Defaults are those of MedSFTModule, MedicalDataModule and Trainer (a test checks).
FIELDS: dict[str, tuple[str, object]] = {
    "model.model_name_or_path": ("str", "medsft:tiny-qwen3"),
    "model.gradient_checkpointing": ("bool", True),
    "model.loss_chunk_size": ("int", 1024),
    "model.fused_adamw": ("bool?", None),
    "model.kahan_summation": ("bool?", None),
    "model.optimizer": ("str", "auto"),
    "model.optimizer_in_backward": ("bool", False),
    "data.batch_size": ("int", 4),
    "data.max_length": ("int", 2048),
    "trainer.precision": ("str", "32-true"),
    "trainer.devices": ("devices", "auto"),
    "trainer.accumulate_grad_batches": ("int", 1),
    "trainer.gradient_clip_val": ("float?", None),
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
    kahan_summation: bool | None
    cpu: bool  # trainer.accelerator cpu: no Triton for torch-optimi, PyTorch's non-fused AdamW is a for-loop
    choice: str = "auto"  # model.optimizer as written
    in_backward: bool = False  # model.optimizer_in_backward
    device_memory: int | None = None  # --device_memory, bytes
    device_name: str = ""  # where device_memory came from
    clip: float | None = None  # trainer.gradient_clip_val

    @property
    def resolved(self) -> str:
        """The optimizer ``model.optimizer`` runs for these weights (``training.optim_choice.resolve``)."""
        try:
            return resolve(self.choice, weights_of(self.precision), self.kahan_summation)
        except ValueError as err:
            raise EstimateError(str(err)) from None

    @property
    def kahan(self) -> bool:
        """Whether torch-optimi's Kahan-compensated AdamW runs."""
        return self.resolved == "kahan"

    @property
    def optimizer(self) -> str:
        """How the optimizer step runs (``memory.OPTIMIZERS``), as ``optim.build`` picks it."""
        if self.kahan:  # torch-optimi: its Triton kernel on a GPU (Triton ships with PyTorch's CUDA wheels)
            return "optimi-for-loop" if self.cpu else "optimi-triton"
        if self.resolved == "adamw8bit_sr":  # torchao: compiled on CUDA, eager on the CPU (optim_lowbit.py)
            return "torchao-eager" if self.cpu else "torchao"
        return "fused" if self.fused_adamw else ("for-loop" if self.cpu else "foreach")


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
    if kind == "float?":
        if value is None or text in ("null", "none"):
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise EstimateError(f"{origin}={value!r}: use a number or null") from None
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


def resolve_arch(name_or_path: str) -> Arch:
    """The architecture of ``medsft:tiny-qwen3``, a local folder, or a built-in Qwen3 id. Never downloads."""
    from medsft_lightning import hub

    if name_or_path == hub.TINY_MODEL:  # the tiny model is defined by TINY_CONFIG: no need to build it
        from medsft_lightning.hub.tiny import TINY_CONFIG, VOCAB_SIZE

        return arch_from_config({**TINY_CONFIG, "vocab_size": VOCAB_SIZE}, f"{name_or_path} (tiny.TINY_CONFIG)")
    local = Path(name_or_path).expanduser()
    if local.exists():
        config = local / "config.json" if local.is_dir() else local
        if not config.is_file():
            raise EstimateError(f"--model {name_or_path!r}: the folder has no config.json")
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise EstimateError(f"{config}: not readable JSON ({err})") from None
        return arch_from_config(cfg, str(config))
    model_id = name_or_path.removeprefix(hub.HF_PREFIX).removesuffix("-Base")
    for known, arch in QWEN3_ARCHS.items():
        if known.lower() == model_id.lower():
            return arch
    raise EstimateError(
        f"--model {name_or_path!r}: no such local folder, and not a built-in architecture "
        f"({', '.join(QWEN3_ARCHS)}); pass a local model folder with its config.json (nothing is downloaded)"
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise EstimateError(f"{message} (see medsft memory --help)")


def parse(argv: list[str]) -> tuple[Settings, list[str]]:
    """Settings from ``--config`` files (later ones win) and flags (win over files); notes on assumptions."""
    parser = _Parser(prog="medsft memory", allow_abbrev=False,
                     description="Estimate one device's training memory for a medsft config (nothing is loaded).")
    parser.add_argument("--config", action="append", default=[], help="a medsft fit YAML (repeatable)")
    for field, (kind, default) in FIELDS.items():
        metavar = {"int": "INT", "bool": "BOOL", "bool?": "BOOL|null", "float?": "FLOAT|null", "devices": "N"}.get(
            kind, "VALUE")
        parser.add_argument(f"--{field}", dest=field, default=None, metavar=metavar,
                            help=f"overrides the config; default {default!r}")
    for flag, field in ALIASES.items():
        parser.add_argument(flag, dest=field, default=None, metavar="VALUE", help=f"same as --{field}")
    parser.add_argument("--device_memory", default=None, metavar="SIZE",
                        help="the GPU's memory (24GiB, 24GB, 16384MiB, or auto: the visible GPU's): say whether the "
                             "config fits and what to change if not")
    args = vars(parser.parse_args(argv))
    device_memory, device_name = _device_memory(args.pop("device_memory"))
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
    accelerator = str(val["trainer.accelerator"]).lower()
    fused = val["model.fused_adamw"]
    if fused is None:  # MedSFTModule: fused when training on CUDA or the CPU, not under *-mixed precision
        mixed = _PRECISION_ALIASES.get(str(val["trainer.precision"]), str(val["trainer.precision"])).endswith("-mixed")
        fused = accelerator in ("auto", "gpu", "cuda", "cpu") and not mixed
    settings = Settings(
        model=val["model.model_name_or_path"], batch_size=val["data.batch_size"], max_length=val["data.max_length"],
        precision=str(val["trainer.precision"]), checkpointing=val["model.gradient_checkpointing"],
        chunk_size=val["model.loss_chunk_size"], devices=devices,
        strategy=_strategy(val["trainer.strategy"], raw["trainer.strategy"][1]),
        accumulate=val["trainer.accumulate_grad_batches"], fused_adamw=fused,
        kahan_summation=val["model.kahan_summation"], cpu=accelerator == "cpu", choice=val["model.optimizer"],
        in_backward=val["model.optimizer_in_backward"], device_memory=device_memory, device_name=device_name,
        clip=val["trainer.gradient_clip_val"],
    )
    settings.resolved  # fails early on an optimizer that cannot run
    return settings, notes


def _device_memory(text: str | None) -> tuple[int | None, str]:
    """``--device_memory``: bytes and where they came from (``auto``: the first visible CUDA GPU)."""
    if text is None:
        return None, ""
    if str(text).strip().lower() == "auto":
        import torch

        if not torch.cuda.is_available():
            raise EstimateError("--device_memory auto: no CUDA GPU is visible here; pass the size, e.g. 24GiB")
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name}, GPU 0"
    try:
        return parse_size(text), f"--device_memory {text}"
    except ValueError as err:
        raise EstimateError(f"--device_memory {err}") from None
