"""``medsft memory``'s printed report (the settings it reads: :mod:`medsft_lightning.tools.memory_settings`)."""

from __future__ import annotations

import sys
from dataclasses import replace

from medsft_lightning.tools.memory import GIB, Arch, EstimateError, estimate, layer_activation_bytes, precision_of
from medsft_lightning.tools.memory_settings import FIELDS, Settings, parse, resolve_arch

__all__ = ["FIELDS", "Settings", "estimate_for", "main", "parse", "report", "resolve_arch", "run"]


def estimate_for(arch: Arch, s: Settings) -> dict:
    """``estimate`` for these settings."""
    return estimate(arch, s.batch_size, s.max_length, s.precision, s.checkpointing, s.chunk_size,
                    s.devices, s.strategy, s.optimizer)


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
    if s.kahan or precision_of(s.precision).param == 2:
        alt.append((f"kahan_summation {str(not s.kahan).lower()}", replace(s, kahan_summation=not s.kahan),
                    "updates below bf16 resolution are lost" if s.kahan else "keeps updates below bf16 resolution"))
    if not s.kahan and not s.fused_adamw:
        alt.append(("fused_adamw true", replace(s, fused_adamw=True), "CUDA and CPU"))
    deltas = [(name, (estimate_for(arch, alt_s)["total"] - total) / GIB, why) for name, alt_s, why in alt]
    return [f"  {name:<40}{delta:+8.2f} GiB  {why}" for name, delta, why in deltas if round(delta, 2)]


_OPTIMIZER_NAMES = {  # name in the header, what its step allocates beyond the states (memory.py)
    "fused": ("AdamW fused", ""), "foreach": ("AdamW foreach", "sqrt of every second moment at once"),
    "for-loop": ("AdamW for-loop", "2 × the largest parameter (the embedding)"),
    "optimi-triton": ("AdamW torch-optimi + Kahan, Triton", ""),
    "optimi-for-loop": ("AdamW torch-optimi + Kahan, for-loop", "the largest parameter (the embedding)"),
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
        *row("gradients", "gradients", f"{pr.param} B/param{shard}"),
        *row("DDP gradient buckets", "ddp_buckets", "a second gradient copy", est["ddp_buckets"] > 0),
        *row("FSDP gathered weights + gradients", "fsdp_gathered", "embedding + 2 decoder layers unsharded",
             est["fsdp_gathered"] > 0),
        *row("AdamW states", "optimizer", f"2 moments × {pr.param} B/param{shard}"),
        *row("Kahan compensation", "kahan", f"{pr.param} B/param{shard} (torch-optimi; fp32 for norm weights)",
             est["kahan"] > 0),
        *row(f"activations, checkpointing {on_off}", "activations", ckpt if s.checkpointing else full),
        *row(f"checkpointing {'off' if s.checkpointing else 'on'}",
             "activations_full" if s.checkpointing else "activations_checkpointed",
             "not counted: " + (full if s.checkpointing else ckpt), indent=True),
        *row("loss, chunked", "loss_chunked",
             f"{chunk:,} × {v:,} × {logit_b} B logits + {v:,} × {arch.hidden_size:,} × {head_b} B LM-head gradient"),
        *row("seed-style full logits", "loss_full", f"not counted: {tokens:,} × {v:,} × {pr.act + 8} B", indent=True),
        *row("AdamW step temporaries", "optimizer_step_temp", f"{_OPTIMIZER_NAMES[s.optimizer][1]}; counted if "
             "above activations + loss", est["optimizer_step_temp"] > 0),
        f"{'total':<40}{est['total'] / GIB:>8.2f}  GiB per device",
    ]


def _disk_rows(s: Settings, est: dict) -> list[str]:
    disk, p = est["disk"], precision_of(s.precision).param
    parts = f"weights + 2 AdamW moments{' + Kahan compensation' if est['kahan'] else ''}"
    per_param = disk["checkpoint"] // est["params"]
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
        f"({s.batch_size * s.accumulate * s.devices} rows per optimizer step) · {_OPTIMIZER_NAMES[s.optimizer][0]}",
        *[f"  note: {note}" for note in notes or []],
        "",
        f"parameters {n:,} ({size}{stored})",
        "",
        f"{'':40}{'GiB':>8}  how",
        *_memory_rows(arch, s, est),
        "",
        "What a knob would change (GiB of the total):",
        *_hints(arch, s, est["total"]),
        "",
        *_disk_rows(s, est),
        "",
        "An estimate, not a promise: everything above counted as alive at once, rows padded to max_length.",
        "Not counted: the CUDA context (~0.5 GiB), allocator fragmentation, backward's temporary buffers;",
        "measured H200 peaks were 2-5% above it. Formulas and checks: medsft_lightning/tools/memory.py.",
    ]
    return "\n".join(lines)


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
