"""``medsft memory``'s printed report (the settings it reads: :mod:`medsft_lightning.tools.memory_settings`)."""

from __future__ import annotations

import sys
from dataclasses import replace

from medsft_lightning.tools.memory import GIB, Arch, EstimateError, estimate, layer_activation_bytes, precision_of
from medsft_lightning.tools.memory_settings import FIELDS, Settings, parse, resolve_arch
from medsft_lightning.training.optim_choice import weights_of

__all__ = ["FIELDS", "Settings", "estimate_for", "main", "parse", "report", "resolve_arch", "run"]


def estimate_for(arch: Arch, s: Settings) -> dict:
    """``estimate`` for these settings (``total_device``: with what a GPU adds, unless on the CPU)."""
    return estimate(arch, s.batch_size, s.max_length, s.precision, s.checkpointing, s.chunk_size,
                    s.devices, s.strategy, s.optimizer, in_backward=s.in_backward, gpu=not s.cpu)


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
        flipped = other[s.precision]  # under *-mixed MedSFTModule's default AdamW is foreach, not fused
        fused = s.fused_adamw and not flipped.endswith("-mixed")
        alt.append((flipped, replace(s, precision=flipped, fused_adamw=fused),
                    "fp32 weights and AdamW states" if s.precision.endswith("true") else "bf16 weights and states"))
    for choice in _choices(s):
        if choice != s.resolved:
            alt.append((f"optimizer {choice}", replace(s, choice=choice, kahan_summation=None), _WHY[choice]))
    if not s.in_backward and s.devices == 1:
        alt.append(("optimizer_in_backward true", replace(s, in_backward=True),
                    "needs accumulate_grad_batches 1, no gradient clipping, one device"))
    if s.resolved == "adamw" and not s.fused_adamw:
        alt.append(("fused_adamw true", replace(s, fused_adamw=True), "CUDA and CPU"))
    deltas = [(name, (estimate_for(arch, alt_s)["total_device"] - total) / GIB, why) for name, alt_s, why in alt]
    return [f"  {name:<40}{delta:+8.2f} GiB  {why}" for name, delta, why in deltas if round(delta, 2)]


_WHY = {"adamw": "bf16 weights: most updates at lr 1e-5 rounded away", "kahan": "bf16 moments drift from fp32's",
        "adamw8bit_sr": "8-bit moments, stochastic rounding (the bf16 default)"}


def _choices(s: Settings) -> list[str]:
    """The ``model.optimizer`` choices that run on these settings' weights."""
    weights = weights_of(s.precision)
    return {"bf16": ["adamw8bit_sr", "kahan", "adamw"], "fp16": ["kahan", "adamw"]}.get(weights,
                                                                                      ["adamw", "adamw8bit_sr"])


CARDS = (16, 24, 40, 80)


def _choice_rows(arch: Arch, s: Settings) -> list[str]:
    """Each optimizer choice at these settings: state bytes per parameter, the total, the cards it fits."""
    variants = [(f"{c}{' (this config)' if c == s.resolved else ''}", replace(s, choice=c, kahan_summation=None))
                for c in _choices(s)]
    if weights_of(s.precision) == "bf16":  # the reference: fp32 master weights and moments
        mixed = replace(s, precision="bf16-mixed", choice="adamw", kahan_summation=None, fused_adamw=False)
        variants.append(("fp32 master + moments (bf16-mixed, adamw)", mixed))
    if not s.in_backward and s.devices == 1:  # DDP/FSDP average gradients after the hooks would have stepped
        variants.append((f"{s.resolved} + optimizer_in_backward", replace(s, in_backward=True)))
    lines = [f"{'':44}{'B/param':>8}{'GiB':>8}" + "".join(f"{f'{c} GiB':>8}" for c in CARDS)]
    for name, v in variants:
        est = estimate_for(arch, v)
        per_param = (est["optimizer"] + est["kahan"]) / est["params"]
        fits = "".join(f"{'fits' if est['total_device'] <= c * GIB else '-':>8}" for c in CARDS)
        lines.append(f"  {name:<42}{per_param:>8.2f}{est['total_device'] / GIB:>8.2f}{fits}")
    return lines


_OPTIMIZER_NAMES = {  # name in the header, what its step allocates beyond the states (memory_optim.py)
    "fused": ("AdamW fused", ""), "foreach": ("AdamW foreach", "sqrt of every second moment at once"),
    "for-loop": ("AdamW for-loop", "2 × the largest parameter (the embedding)"),
    "optimi-triton": ("AdamW torch-optimi + Kahan, Triton", ""),
    "optimi-for-loop": ("AdamW torch-optimi + Kahan, for-loop", "the largest parameter (the embedding)"),
    "torchao": ("AdamW8bit torchao + stochastic rounding, compiled", "fp32 moments of the largest parameter"),
    "torchao-eager": ("AdamW8bit torchao + stochastic rounding, eager", "~57 B per value of the largest parameter"),
}


def _gib(value: int, indent: bool = False) -> str:
    return f"({value / GIB:.2f})" if indent else f"{value / GIB:.2f}"


def _memory_rows(arch: Arch, s: Settings, est: dict) -> list[str]:
    pr, layers, tokens, v = precision_of(s.precision), arch.num_hidden_layers, est["tokens"], arch.vocab_size
    shard = f" / {s.devices} devices" if est["strategy"] == "fsdp" and s.devices > 1 else ""
    on_off = "on" if s.checkpointing else "off"
    ckpt = f"{layers} layer inputs × {pr.resid} B × hidden + 1 layer recomputed + final norm"
    full = f"{layers} layers × {layer_activation_bytes(arch, s.precision, s.max_length):,} B/token + final norm"
    logit_b, head_b = 4 + (2 if pr.act == 2 else 0), 4 + (pr.param if pr.param != 4 else 0)
    chunk = min(s.chunk_size, tokens)

    def row(label: str, key: str, how: str, shown: bool = True, indent: bool = False) -> list[str]:
        if not shown:
            return []
        return [f"{'  ' * indent}{label:<{40 - 2 * indent}}{_gib(est[key], indent):>8}  {how}"]

    return [
        *row("weights", "weights", f"{pr.param} B/param{shard}"),
        *row("autocast bf16 weight copies", "autocast_copies", f"{pr.autocast} B/param", est["autocast_copies"] > 0),
        *row("gradients", "gradients", "in flight only: the embedding's + one layer's (stepped in backward)"
             if s.in_backward else f"{pr.param} B/param{shard}"),
        *row("DDP gradient buckets", "ddp_buckets", "a second gradient copy", est["ddp_buckets"] > 0),
        *row("FSDP gathered weights + gradients", "fsdp_gathered", "embedding + 2 decoder layers unsharded",
             est["fsdp_gathered"] > 0),
        *row("optimizer moments", "optimizer", _moments_how(s, est, pr.param) + shard),
        *row("Kahan compensation", "kahan", f"{pr.param} B/param{shard} (torch-optimi; fp32 for norm weights)",
             est["kahan"] > 0),
        *row(f"activations, checkpointing {on_off}", "activations", ckpt if s.checkpointing else full),
        *row(f"checkpointing {'off' if s.checkpointing else 'on'}",
             "activations_full" if s.checkpointing else "activations_checkpointed",
             "not counted: " + (full if s.checkpointing else ckpt), indent=True),
        *row("loss, chunked", "loss_chunked",
             f"{chunk:,} × {v:,} × {logit_b} B logits + {v:,} × {arch.hidden_size:,} × {head_b} B LM-head gradient"),
        *row("seed-style full logits", "loss_full", f"not counted: {tokens:,} × {v:,} × {pr.act + 8} B", indent=True),
        *row("optimizer step temporaries", "optimizer_step_temp", f"{_OPTIMIZER_NAMES[s.optimizer][1]}; " + (
             "counted beside activations + loss (in backward)" if s.in_backward and not arch.tie_word_embeddings else
             "counted if above activations + loss"), est["optimizer_step_temp"] > 0),
        *_device_rows(est),
        f"{'total':<40}{est['total_device'] / GIB:>8.2f}  GiB per device",
    ]


def _moments_how(s: Settings, est: dict, p: int) -> str:
    if s.resolved != "adamw8bit_sr":
        return f"2 moments × {p} B/param"
    shards = s.devices if est["strategy"] == "fsdp" else 1
    return f"{est['optimizer'] * shards / est['params']:.2f} B/param: 2 × 8-bit codes + block scales (torchao)"


def _device_rows(est: dict) -> list[str]:
    """What a GPU adds beyond the tensors (``memory_optim``); nothing on the CPU."""
    dev = est["device"]
    if not any(dev.values()):
        return []
    rows = [(f"{'tensors':<40}{est['total'] / GIB:>8.2f}  all of the above", True),
            (f"{'CUDA context':<40}{dev['cuda_context'] / GIB:>8.2f}  allowance: CUDA context, cuBLAS, kernels "
             "(typically 0.5-1 GiB)", True),
            (f"{'allocator slack, backward temporaries':<40}{dev['slack'] / GIB:>8.2f}  allowance: 5% of the tensors "
             "(H200 peaks ran 2-5% above them)", True),
            (f"{'NCCL buffers':<40}{dev['nccl'] / GIB:>8.2f}  allowance: communication buffers of each process",
             dev["nccl"] > 0)]
    return [text for text, shown in rows if shown]


def _disk_rows(s: Settings, est: dict) -> list[str]:
    disk, p = est["disk"], precision_of(s.precision).param
    parts = ("weights + 8-bit moments (codes + block scales)" if s.resolved == "adamw8bit_sr" else
             f"weights + 2 AdamW moments{' + Kahan compensation' if est['kahan'] else ''}")
    per_param = f"{disk['checkpoint'] / est['params']:.2f}".rstrip("0").rstrip(".")
    return [
        "Disk, one run (GiB; a tied LM head is stored once):",
        f"  {'one checkpoint (.ckpt)':<38}{_gib(disk['checkpoint']):>8}  {parts}: {per_param} B/param",
        f"  {'hf_model export':<38}{_gib(disk['export']):>8}  weights only, {p} B/param (+ tokenizer files, ~11 MB)",
        f"  {'needed at the peak':<38}{_gib(disk['peak']):>8}  best.ckpt + last.ckpt + last.ckpt.tmp-<pid> "
        "+ hf_model",
    ]


def report(arch: Arch, s: Settings, notes: list[str] | None = None) -> str:
    """The printed table."""
    est = estimate_for(arch, s)
    n, tokens = est["params"], est["tokens"]
    size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    stored = f"; tied LM head once, published files hold {est['params_stored']:,}" if arch.tie_word_embeddings else ""
    lines = [
        f"medsft memory: estimate for one device; {arch.source}",
        f"  {s.precision} · micro-batch {s.batch_size} × {s.max_length:,} = {tokens:,} tokens · gradient checkpointing "
        f"{'on' if s.checkpointing else 'off'} · loss chunk {s.chunk_size:,}",
        f"  {s.devices} device{'s' if s.devices > 1 else ''}, strategy {est['strategy']} · accumulate {s.accumulate} "
        f"({s.batch_size * s.accumulate * s.devices} rows per optimizer step)",
        f"  optimizer {s.resolved} (model.optimizer {s.choice}): {_OPTIMIZER_NAMES[s.optimizer][0]}"
        + (", stepped inside backward" if s.in_backward else ""),
        *[f"  note: {note}" for note in notes or []],
        "",
        f"parameters {n:,} ({size}{stored})",
        "",
        f"{'':40}{'GiB':>8}  how",
        *_memory_rows(arch, s, est),
        "",
        "What a knob would change (GiB of the total):",
        *_hints(arch, s, est["total_device"]),
        "",
        "Each optimizer at these settings (state bytes per parameter as measured, total per device, cards it fits):",
        *_choice_rows(arch, s),
        *_verdict(arch, s, est),
        "",
        *_disk_rows(s, est),
        "",
        "An estimate, not a promise: everything above counted as alive at once, rows padded to max_length;",
        "the device allowances are typical figures, not measured here. Formulas and checks:",
        "medsft_lightning/tools/memory.py, memory_optim.py.",
    ]
    return "\n".join(lines)


def _verdict(arch: Arch, s: Settings, est: dict) -> list[str]:
    """``--device_memory``: whether the config fits, and which settings would make it fit if not."""
    if s.device_memory is None:
        return []
    size, need = s.device_memory, est["total_device"]
    head = f"On {size / GIB:.2f} GiB ({s.device_name}): "
    if need <= size:
        return ["", head + f"fits: {need / GIB:.2f} GiB needed, {(size - need) / GIB:.2f} GiB to spare."]
    lines = ["", head + f"does NOT fit: {need / GIB:.2f} GiB needed, {(need - size) / GIB:.2f} GiB over."]
    changes = _fixes(arch, s)
    alone = [(flag, total) for flag, _, total in changes if total <= size]
    if alone:
        lines.append("Any one of these makes it fit:")
        lines += [f"  {flag}  ({total / GIB:.2f} GiB)" for flag, total in alone[:4]]
        return lines
    chosen, current = [], s
    for flag, change, _ in sorted(changes, key=lambda c: c[2]):
        current = change(current)
        chosen.append(flag)
        if estimate_for(arch, current)["total_device"] <= size:
            return lines + ["No single setting is enough; together these make it fit "
                            f"({estimate_for(arch, current)['total_device'] / GIB:.2f} GiB):", f"  {' '.join(chosen)}"]
    return lines + ["Not even all of the settings above together fit; train LoRA adapters (configs/lora.yaml) or "
                    "shard over several GPUs (FSDP2, docs/scaling.md)."]


def _fixes(arch: Arch, s: Settings) -> list[tuple[str, object, int]]:
    """Single changes that lower the total: (flags, how to apply it, the total after it), least invasive first."""
    options = []
    if s.resolved != "adamw8bit_sr" and "adamw8bit_sr" in _choices(s):
        options.append(("--model.optimizer adamw8bit_sr", lambda v: replace(v, choice="adamw8bit_sr",
                                                                             kahan_summation=None)))
    if s.chunk_size > 256:
        options.append((f"--model.loss_chunk_size {s.chunk_size // 2}",
                        lambda v: replace(v, chunk_size=v.chunk_size // 2)))
    if s.batch_size > 1:
        options.append((f"--data.batch_size {s.batch_size // 2} --trainer.accumulate_grad_batches {s.accumulate * 2}",
                        lambda v: replace(v, batch_size=v.batch_size // 2, accumulate=v.accumulate * 2)))
    if not s.checkpointing:
        options.append(("--model.gradient_checkpointing true", lambda v: replace(v, checkpointing=True)))
    if not s.in_backward and s.accumulate == 1 and not s.clip and s.devices == 1:
        options.append(("--model.optimizer_in_backward true", lambda v: replace(v, in_backward=True)))
    if s.max_length > 1024:
        options.append((f"--data.max_length {s.max_length // 2}", lambda v: replace(v, max_length=v.max_length // 2)))
    return [(flag, change, estimate_for(arch, change(s))["total_device"]) for flag, change in options]


def run(argv: list[str]) -> str:
    """Parse ``argv``, resolve the architecture and return the report."""
    settings, notes = parse(argv)
    return report(resolve_arch(settings.model), settings, notes)


def main(argv: list[str] | None = None) -> None:
    """``medsft memory --config FILE [overrides]``: print a memory estimate for a training config."""
    try:
        print(run(sys.argv[1:] if argv is None else argv))  # the command's report, on stdout
    except EstimateError as err:
        sys.exit(f"medsft memory: error: {err}")


if __name__ == "__main__":  # through the package module, so that its EstimateError is the one raised
    from medsft_lightning.tools import memory_report

    memory_report.main()
