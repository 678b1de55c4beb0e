"""Cross-entropy straight from hidden states, in chunks, without the full logits tensor.

Only supervised positions go through the LM head, and they go in chunks of ``chunk_size`` tokens: the
``[chunk, vocab]`` logits (fp32 for the softmax) live in one buffer reused by every chunk, never
``[tokens, 151,936]``. When gradients are needed, each chunk's gradients for the hidden states and the
LM-head weight are computed right away in the forward pass (as Liger's fused linear cross-entropy
does), so nothing per-chunk is kept for backward; the LM-head gradient is summed in one fp32
``[vocab, hidden]`` accumulator. Every large tensor is allocated once per call (``_ChunkBuffers``), so
the peak is exactly what ``tools.memory.chunked_loss_bytes`` counts.
"""

from __future__ import annotations

import torch

from medsft_lightning.data.collate import IGNORE_INDEX

_CPU_ADD_ELEMENTS = 1 << 20  # fp32 elements of one slice of the LM-head gradient added on CPU (4 MiB)


class _ChunkBuffers:
    """The memory every chunk reuses, allocated once per call.

    - ``logits``: one fp32 ``[chunk, vocab]`` buffer for the logits and, in place, their softmax gradient.
      On CPU a fresh ``[chunk, vocab]`` tensor per chunk is fresh memory, and the kernel's page faults on
      first touch cost more than the GEMM itself; anywhere, it keeps the previous chunk's logits from
      still being alive while the next chunk's are computed.
    - ``native`` (bf16/fp16 weights only): one ``[chunk, vocab]`` buffer in the weight dtype, the output of
      the half-precision logits GEMM (then upcast into ``logits``) and later the half-precision copy of the
      gradient that the next two GEMMs take.
    - ``product`` (bf16/fp16 weights whose gradient is needed): one ``[vocab, hidden]`` buffer in the weight
      dtype for each chunk's LM-head gradient GEMM, added in place into the fp32 accumulator. On CUDA the
      mixed-dtype add upcasts inside its kernel (no fp32 copy of the product); on the CPU TensorIterator
      upcasts an input into a temporary of its size (``compute_types``), so there it goes in 4 MiB slices.

    What this holds is what ``tools.memory.chunked_loss_bytes`` counts (``benchmarks/loss_chunk_memory.py``).
    """

    def __init__(self, rows: int, weight: torch.Tensor, chunk_size: int, need_w: bool) -> None:
        shape, device = (min(chunk_size, rows), weight.size(0)), weight.device
        self.logits = torch.empty(shape, dtype=torch.float32, device=device)
        half = weight.dtype != torch.float32
        self.native = torch.empty(shape, dtype=weight.dtype, device=device) if half else None
        self.product = torch.empty(weight.shape, dtype=weight.dtype, device=device) if half and need_w else None

    def chunk_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a chunk (a view of ``logits``): an fp32 GEMM, or a half-precision one upcast."""
        out = self.logits[: hidden.size(0)]
        if self.native is None:
            return torch.mm(hidden, weight.t(), out=out)
        return out.copy_(torch.mm(hidden, weight.t(), out=self.native[: hidden.size(0)]))

    def in_weight_dtype(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` in the weight dtype: itself for fp32 weights, else rounded into ``native``."""
        return grad if self.native is None else self.native[: grad.size(0)].copy_(grad)

    def add_weight_grad(self, grad_w: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
        """``grad_w += grad.T @ hidden``: fp32 in place, or a half-precision tensor-core GEMM (fp32
        accumulation inside) into ``product``, summed over chunks in fp32."""
        if self.product is None:
            grad_w.addmm_(grad.t(), hidden)
            return
        product = torch.mm(grad.t(), hidden, out=self.product)
        if grad_w.device.type != "cpu":  # CUDA upcasts a mixed-dtype input inside the add kernel
            grad_w.add_(product)
            return
        # CPU kernels upcast a mixed-dtype input into a temporary of its full size: add in 4 MiB slices.
        rows = max(1, _CPU_ADD_ELEMENTS // grad_w.size(1))
        for part_w, part in zip(grad_w.split(rows), product.split(rows), strict=True):
            part_w.add_(part)


def _chunk_loop(buffers: _ChunkBuffers, hidden, weight, targets, chunk_size: int, grad_h, grad_w) -> torch.Tensor:
    """Summed loss over the chunks; writes ``grad_h`` and adds into ``grad_w`` (when not ``None``)."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        rows = torch.arange(t.numel(), device=t.device)
        logits = buffers.chunk_logits(h, weight)
        target_logit = logits[rows, t]
        # Softmax in place over the one [chunk, vocab] buffer: max, subtract, exp, normalise.
        peak = logits.amax(dim=-1, keepdim=True)
        total = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
        loss += (total.log() + peak).squeeze(1).sub(target_logit).sum()
        grad = logits.div_(total)  # d(sum CE)/d(logits) = softmax - one_hot, in fp32
        grad[rows, t] -= 1.0
        grad_lp = buffers.in_weight_dtype(grad)
        torch.mm(grad_lp, weight, out=grad_h[start : start + chunk_size])  # no [chunk, hidden] temporary
        if grad_w is not None:
            buffers.add_weight_grad(grad_w, grad_lp, h)
    return loss


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        grad_h = torch.empty_like(hidden)
        need_w = ctx.needs_input_grad[1]  # False under LoRA: the LM head is frozen, skip a third of the work
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buffers = _ChunkBuffers(hidden.size(0), weight, chunk_size, need_w)
        loss = _chunk_loop(buffers, hidden, weight, targets, chunk_size, grad_h, grad_w)
        del buffers  # freed before the fp32 gradient is rounded to the weight dtype: not alive together
        # Kept as attributes, not saved tensors: backward scales them in place (one [vocab, hidden] buffer
        # fewer at the peak); backward runs once (the graph is never retained through this loss).
        ctx.grad_h, ctx.grad_w = grad_h, grad_w.to(weight.dtype) if need_w else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        del ctx.grad_h, ctx.grad_w
        scaled_w = grad_w.mul_(grad_loss.to(grad_w.dtype)) if grad_w is not None else None
        return grad_h.mul_(grad_loss.to(grad_h.dtype)), scaled_w, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of ``labels`` given last hidden states.

    Args:
        hidden: ``[batch, seq, hidden]`` final hidden states (after the last norm).
        weight: ``[vocab, hidden]`` LM-head weight.
        labels: ``[batch, seq]`` with -100 where nothing is supervised (not yet shifted).
        chunk_size: supervised tokens per LM-head chunk; peak extra memory ``chunk_size × vocab × 4`` bytes
            (+ 2 for bf16 weights) + the LM-head gradient (``tools.memory.chunked_loss_bytes`` counts it all).

    Returns:
        ``(loss_sum, num_supervised, num_correct)``: fp32 summed loss, supervised-token count, and
        how many of them the argmax predicts (-1 when gradients are computed: not measured then).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    t = targets[keep]
    count = keep.sum()
    if t.numel() == 0:
        zero = hidden.sum() * 0.0  # keeps the graph connected for DDP
        return zero.float(), count, count
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        # Training: no accuracy (an argmax over every chunk would cost ~10% of the step).
        return _ChunkedLinearCE.apply(h, weight, t, chunk_size), count, torch.full_like(count, -1)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    buffers = _ChunkBuffers(t.numel(), weight, chunk_size, need_w=False)
    for start in range(0, t.numel(), chunk_size):
        logits = buffers.chunk_logits(h[start : start + chunk_size], weight)
        tc = t[start : start + chunk_size]
        loss += torch.nn.functional.cross_entropy(logits, tc, reduction="sum")
        correct += (logits.argmax(-1) == tc).sum()
    return loss, count, correct


def lm_loss(lm: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int, **inputs):
    """``(loss_sum, num_supervised, num_correct)`` of a causal LM: decoder hidden states → chunked CE.

    The path of every training and validation step (``MedSFTModule``); under FSDP2 it runs inside the root
    unit's forward (``sharding.LossRoot``).
    """
    hidden = lm.model(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
    return chunked_cross_entropy(hidden, lm.get_output_embeddings().weight, labels, chunk_size)
