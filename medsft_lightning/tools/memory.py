"""``medsft memory``: an estimate of one device's training memory for a config, before a run.

Pure arithmetic (no torch, nothing downloaded). Per device, in bytes, for T = batch_size × max_length
tokens per micro-batch, with p / a / r the bytes of a parameter / a matmul activation / the residual
stream (bf16-true 2/2/2, bf16-mixed 4/2/4, 32-true 4/4/4):

- weights N·p, gradients N·p (``optimizer_in_backward``: the largest tensor's + one layer's); bf16-mixed adds
  N·2 for autocast's bf16 weight copies. N counts a tied LM head once. The optimizer state of each
  ``model.optimizer`` choice and its step temporaries, per parameter tensor: ``memory_optim``.
- activations per token per decoder layer (what a Qwen3 layer with SDPA keeps for backward):
  2 RMSNorms (4+r)·H each (fp32 copy + normalised) + their outputs a·H each; q and k: (4+a)·d
  (q/k-norm) + what SDPA saves of q, k, v (a·q_dim, and k, v repeated to all heads, a·q_dim each,
  when a padding mask is present, since transformers uses SDPA's own GQA only without a mask) +
  SDPA output a·q_dim (also o_proj's input: the transpose + contiguous is a no-op on it) +
  logsumexp 4·heads + the additive mask a·S (padded rows) + MLP gate, act, up, product 4·a·I +
  4 B per RMSNorm row (rsqrt). Checked against the tensors a real transformers Qwen3 layer saves
  (saved-tensor hooks, CPU, fp32 and bf16, with and without padding): equal to the byte.
  Without checkpointing: layers × that × T. With checkpointing: layers × r·H·T (layer inputs) + one
  layer's full activations (recomputed in backward). Both add the final norm (4+r)·H·T and, for
  padded rows, the model's bool mask T·S once.
- loss, chunked (``loss._ChunkBuffers``), c = min(chunk, T): fp32 logits c·V·4 (+ c·V·2 bf16: the
  weights' GEMM buffer, or in bf16-mixed autocast's copy) + fp32 LM-head gradient V·H·4 (+ V·H·p for
  bf16/fp16 weights: the per-chunk GEMM buffer, then the rounded result) + hidden rows and their
  gradient 2·T·H·r. Each is one tensor allocated once per call: a call's measured CPU peak equals it, +
  a 4 MiB CPU-only add slice (``tests/test_loss_memory.py``, ``benchmarks/loss_chunk_memory.py``).
  Seed-style full logits, for comparison: T·V·(a + 4 + 4) (logits, fp32 log-probs, their gradient).
- total = weights + gradients (+ DDP buckets) + optimizer state + max(activations + loss, step temporaries)
  (in backward, untied head: their sum), all alive at once; ``total_device`` adds the CUDA context, allocator
  slack and NCCL buffers (``memory_optim``). Against H200 peaks (benchmarks/README.md: Qwen3-1.7B, rows of 2,048,
  unpadded, fused AdamW, the loss before its reused buffers) it was 2-5% low: batch 4 with checkpointing
  17.3 vs 17.7 GiB, batch 2 16.4 vs 17.2, batch 4 without checkpointing 39.7 vs 40.9, seed 16.2 vs 16.6.
- disk: a checkpoint holds weights N·p + the optimizer state (8-bit moments without their code maps), the
  ``hf_model`` export N·p;
  ``torch.save`` and ``save_pretrained`` store a tied LM head once (measured). A run's peak: best.ckpt +
  last.ckpt + last.ckpt's temporary copy while it is rewritten + the export.
"""

from __future__ import annotations

from dataclasses import dataclass

from medsft_lightning.tools import memory_optim

GIB = 1024**3


@dataclass(frozen=True)
class Arch:
    """The Qwen3 numbers the estimate needs (``config.json`` names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    source: str = ""


_PUBLISHED = {  # name: hidden, layers, heads, kv heads, intermediate, tied (all: head_dim 128, vocab 151,936)
    "Qwen/Qwen3-0.6B": (1024, 28, 16, 8, 3072, True),
    "Qwen/Qwen3-1.7B": (2048, 28, 16, 8, 6144, True),
    "Qwen/Qwen3-4B": (2560, 36, 32, 8, 9728, True),
    "Qwen/Qwen3-8B": (4096, 36, 32, 8, 12288, False),
}
QWEN3_ARCHS = {
    name: Arch(h, n, q, kv, 128, i, 151936, tied, source=f"{name} (built-in table of published Qwen3 configs)")
    for name, (h, n, q, kv, i, tied) in _PUBLISHED.items()
}


@dataclass(frozen=True)
class Precision:  # bytes
    param: int  # of a weight, a gradient and an AdamW moment
    act: int  # bytes of a matmul output kept for backward
    resid: int  # bytes of the residual stream / norm outputs
    autocast: int  # bytes per parameter of autocast's low-precision weight copies


PRECISIONS = {
    "32-true": Precision(4, 4, 4, 0),
    "bf16-true": Precision(2, 2, 2, 0),
    "16-true": Precision(2, 2, 2, 0),
    "bf16-mixed": Precision(4, 2, 4, 2),
    "16-mixed": Precision(4, 2, 4, 2),
}
_PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


class EstimateError(ValueError):
    """A model, config or flag the estimate cannot use; the message says which and what to do."""


def arch_from_config(cfg: dict, source: str) -> Arch:
    """``Arch`` from a Qwen3 ``config.json`` dict, with transformers' Qwen3Config defaults."""
    if cfg.get("model_type", "qwen3") != "qwen3":
        raise EstimateError(f"{source}: model_type {cfg.get('model_type')!r}: only Qwen3 ('qwen3') is estimated")
    try:
        return Arch(
            cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg.get("num_key_value_heads") or cfg["num_attention_heads"], cfg.get("head_dim") or 128,
            cfg["intermediate_size"], cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)),
            bool(cfg.get("attention_bias", False)), source,
        )
    except KeyError as err:
        raise EstimateError(f"{source}: missing field {err.args[0]!r}") from None


def layer_param_count(arch: Arch) -> int:
    """Parameters of one decoder layer (q/k/v/o, q/k norms, MLP, two RMSNorms)."""
    h, q_dim = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv_dim = arch.num_key_value_heads * arch.head_dim
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h + 2 * arch.head_dim
    if arch.attention_bias:
        attn += q_dim + 2 * kv_dim + h
    return attn + 3 * h * arch.intermediate_size + 2 * h


def param_count(arch: Arch) -> int:
    """Distinct parameters, as ``sum(p.numel() for p in model.parameters())`` counts them (tied head once)."""
    embed = arch.vocab_size * arch.hidden_size
    head = 0 if arch.tie_word_embeddings else embed
    return embed + arch.num_hidden_layers * layer_param_count(arch) + arch.hidden_size + head


def stored_param_count(arch: Arch) -> int:
    """Parameters with the LM head counted even when tied, as the published Qwen3 files (and the hub's
    parameter figure) hold them; ``torch.save`` and ``save_pretrained`` store a tied head once."""
    return param_count(arch) + (arch.vocab_size * arch.hidden_size if arch.tie_word_embeddings else 0)


def vector_param_count(arch: Arch) -> int:
    """Elements of the 1-D parameters (norm weights, biases): the group ``optim.adamw`` compensates in fp32."""
    return sum(n for n, dims in param_tensors(arch) if dims < 2)


def largest_param_count(arch: Arch) -> int:
    """Elements of the largest single parameter (the embedding, for every Qwen3)."""
    return max(n for n, _ in param_tensors(arch))


def precision_of(precision: str | int) -> Precision:
    """The byte sizes of a Lightning ``trainer.precision`` value."""
    key = _PRECISION_ALIASES.get(str(precision), str(precision))
    if key not in PRECISIONS:
        raise EstimateError(f"--trainer.precision={precision!r}: not estimated; use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def layer_activation_bytes(arch: Arch, precision: str, seq_len: int, padded: bool = True) -> int:
    """Bytes one decoder layer keeps for backward, per token (formula in the module docstring)."""
    pr = precision_of(precision)
    a, r, h = pr.act, pr.resid, arch.hidden_size
    q_dim, kv_dim = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    repeated = padded and arch.num_attention_heads != arch.num_key_value_heads
    sdpa_kv = 2 * a * (q_dim if repeated else kv_dim)
    norms = 2 * ((4 + r) * h + a * h)
    # q/k norms, what SDPA keeps (q, k, v, output = o_proj's input, logsumexp), then the rsqrt factors
    attn = (4 + a) * (q_dim + kv_dim) + a * q_dim + sdpa_kv + a * q_dim + 4 * arch.num_attention_heads
    rsqrt = 4 * (2 + arch.num_attention_heads + arch.num_key_value_heads)
    mask = a * seq_len if padded else 0
    return norms + attn + rsqrt + mask + 4 * a * arch.intermediate_size


def activation_bytes(
    arch: Arch, precision: str, batch_size: int, max_length: int, checkpointing: bool, padded: bool = True
) -> int:
    """Activations of one micro-batch kept for backward, with or without gradient checkpointing."""
    pr = precision_of(precision)
    tokens = batch_size * max_length
    layer = layer_activation_bytes(arch, precision, max_length, padded) * tokens
    final_norm = (4 + pr.resid) * arch.hidden_size * tokens
    mask = tokens * max_length if padded else 0  # the model's bool [batch, 1, S, S] mask, shared by the layers
    if checkpointing:
        return arch.num_hidden_layers * pr.resid * arch.hidden_size * tokens + layer + final_norm + mask
    return arch.num_hidden_layers * layer + final_norm + mask


def chunked_loss_parts(arch: Arch, precision: str, tokens: int, chunk_size: int) -> dict[str, int]:
    """The tensors alive at the peak of medsft's chunked LM-head cross-entropy (``loss.py``), in bytes."""
    pr = precision_of(precision)
    chunk_v = min(chunk_size, tokens) * arch.vocab_size
    head = arch.vocab_size * arch.hidden_size
    return {
        "logits": chunk_v * 4,  # the fp32 [chunk, vocab] buffer
        "logits_low": chunk_v * 2 if pr.act == 2 else 0,  # its bf16/fp16 counterpart (or autocast's copy)
        "grad_w": head * 4,  # the fp32 LM-head gradient accumulator
        "product": head * pr.param if pr.param != 4 else 0,  # the bf16/fp16 per-chunk GEMM buffer
        "rows": 2 * tokens * arch.hidden_size * pr.resid,  # the supervised hidden rows and their gradient
    }


def chunked_loss_bytes(arch: Arch, precision: str, tokens: int, chunk_size: int) -> int:
    """Peak of medsft's chunked LM-head cross-entropy, all supervised tokens assumed."""
    return sum(chunked_loss_parts(arch, precision, tokens, chunk_size).values())


OPTIMIZERS = memory_optim.STEPS


def param_tensors(arch: Arch) -> list[tuple[int, int]]:
    """(values, dimensions) of every distinct parameter tensor of a Qwen3 (a tied LM head once)."""
    h, d, q, kv, i = (arch.hidden_size, arch.head_dim, arch.num_attention_heads * arch.head_dim,
                      arch.num_key_value_heads * arch.head_dim, arch.intermediate_size)
    layer = [(q * h, 2), (kv * h, 2), (kv * h, 2), (h * q, 2), (d, 1), (d, 1), (i * h, 2), (i * h, 2), (h * i, 2),
             (h, 1), (h, 1)] + ([(q, 1), (kv, 1), (kv, 1), (h, 1)] if arch.attention_bias else [])
    head = [] if arch.tie_word_embeddings else [(arch.vocab_size * h, 2)]
    return [(arch.vocab_size * h, 2), *layer * arch.num_hidden_layers, (h, 1), *head]


def optimizer_step_temp_bytes(arch: Arch, precision: str, optimizer: str, shard: int = 1) -> int:
    """What one optimizer step allocates beyond its states (``memory_optim``); ``optimizer`` in OPTIMIZERS."""
    try:
        return memory_optim.step_temp_bytes(param_tensors(arch), precision_of(precision).param, optimizer, shard)
    except ValueError as err:
        raise EstimateError(str(err)) from None


def disk_bytes(arch: Arch, precision: str, optimizer: str) -> dict[str, int]:
    """A checkpoint file, the ``hf_model`` export and a run's peak (module docstring), in bytes."""
    p = precision_of(precision).param
    weights = param_count(arch) * p  # a tied LM head stored once
    ckpt = weights + sum(memory_optim.state_bytes(param_tensors(arch), p, memory_optim.choice_of(optimizer),
                                                  on_disk=True))
    # best.ckpt + last.ckpt + last.ckpt.tmp-<pid> (the old file stays until the rename) + hf_model at the end
    return {"checkpoint": ckpt, "export": weights, "peak": 3 * ckpt + weights}


def full_logits_bytes(arch: Arch, precision: str, tokens: int) -> int:
    """Seed-style loss: ``[tokens, vocab]`` logits, their fp32 log-probs and the fp32 gradient."""
    return tokens * arch.vocab_size * (precision_of(precision).act + 8)


def estimate(
    arch: Arch,
    batch_size: int,
    max_length: int,
    precision: str = "bf16-true",
    checkpointing: bool = True,
    chunk_size: int = 1024,
    devices: int = 1,
    strategy: str = "auto",
    optimizer: str = "fused",
    padded: bool = True,
    in_backward: bool = False,
    gpu: bool = False,
) -> dict:
    """Per-device memory of one training step, in bytes per item (see the module docstring).

    Args:
        arch: the model architecture.
        batch_size: rows per micro-batch (``data.batch_size``).
        max_length: tokens per row, the worst case of padding to the longest row (``data.max_length``).
        precision: Lightning ``trainer.precision``.
        checkpointing: gradient checkpointing (``model.gradient_checkpointing``).
        chunk_size: tokens per LM-head chunk (``model.loss_chunk_size``).
        devices: devices per run (sharding under ``fsdp``, gradient buckets under ``ddp``).
        strategy: ``auto`` (``ddp`` when devices > 1), ``ddp`` or ``fsdp`` (rough: full sharding with each
            decoder layer wrapped; the embedding and two layers gathered at a time).
        optimizer: how the optimizer step runs, one of OPTIMIZERS (``optimi-*``: ``model.optimizer`` kahan,
            ``torchao*``: adamw8bit_sr, the others adamw); its state per tensor: ``memory_optim``.
        padded: rows padded to a common length (an attention mask is passed), as in real batches.
        in_backward: ``model.optimizer_in_backward``: gradients live only until their tensor has stepped (the
            largest tensor's and one decoder layer's counted), the step runs inside backward.
        gpu: add what a GPU adds beyond tensors (``memory_optim.device_overhead``) as ``total_device``.
    """
    pr, n = precision_of(precision), param_count(arch)
    mode = "ddp" if strategy == "auto" and devices > 1 else strategy
    shard = devices if mode == "fsdp" else 1
    tokens = batch_size * max_length
    out = {"params": n, "params_stored": stored_param_count(arch), "tokens": tokens, "strategy": mode}
    out["weights"] = n * pr.param // shard
    out["autocast_copies"] = n * pr.autocast // shard
    tensors = param_tensors(arch)
    in_flight = max(t for t, _ in tensors) + layer_param_count(arch)  # the embedding's and one layer's gradients
    out["gradients"] = (in_flight if in_backward else n) * pr.param // shard
    out["optimizer"], out["kahan"] = memory_optim.state_bytes(tensors, pr.param, memory_optim.choice_of(optimizer),
                                                              shard)
    out["ddp_buckets"] = out["gradients"] if mode == "ddp" and devices > 1 else 0
    # fsdp: the root unit (embedding/LM head) stays gathered; two decoder layers are gathered at a time.
    gathered = arch.vocab_size * arch.hidden_size + 2 * layer_param_count(arch)
    out["fsdp_gathered"] = 2 * gathered * pr.param if mode == "fsdp" and devices > 1 else 0
    out["activations_checkpointed"] = activation_bytes(arch, precision, batch_size, max_length, True, padded)
    out["activations_full"] = activation_bytes(arch, precision, batch_size, max_length, False, padded)
    out["activations"] = out["activations_checkpointed" if checkpointing else "activations_full"]
    out["loss_chunked"] = chunked_loss_bytes(arch, precision, tokens, chunk_size)
    out["loss_full"] = full_logits_bytes(arch, precision, tokens)
    out["optimizer_step_temp"] = optimizer_step_temp_bytes(arch, precision, optimizer, shard)
    out["disk"] = disk_bytes(arch, precision, optimizer)
    static = sum(out[k] for k in ("weights", "autocast_copies", "gradients", "optimizer", "kahan", "ddp_buckets"))
    forward = out["activations"] + out["loss_chunked"]
    alongside = in_backward and not arch.tie_word_embeddings
    step = forward + out["optimizer_step_temp"] if alongside else max(forward, out["optimizer_step_temp"])
    out["total"] = static + out["fsdp_gathered"] + step
    out["device"] = memory_optim.device_overhead(out["total"], gpu, devices)
    out["total_device"] = out["total"] + sum(out["device"].values())
    return out
