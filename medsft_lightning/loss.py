"""Cross-entropy straight from hidden states, in chunks, without the full logits tensor.

Only supervised positions go through the LM head, and they go in chunks of ``chunk_size`` tokens: the
``[chunk, vocab]`` logits (fp32 for the softmax) are the largest thing alive, never
``[tokens, 151,936]``. When gradients are needed, each chunk's gradients for the hidden states and the
LM-head weight are computed right away in the forward pass (as Liger's fused linear cross-entropy
does), so nothing per-chunk is kept for backward.
"""

from __future__ import annotations

import torch

from medsft_lightning.collate import IGNORE_INDEX


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk, written into the start of ``buffer`` when the weights are fp32.

    Reusing one buffer for every chunk matters on CPU: a fresh ``[chunk, vocab]`` tensor is fresh memory,
    and the kernel's page faults on first touch cost more than the GEMM itself.
    """
    if buffer is not None:
        return torch.mm(hidden, weight.t(), out=buffer[: hidden.size(0)])
    return (hidden @ weight.t()).float()


def _logits_buffer(rows: int, weight: torch.Tensor, chunk_size: int) -> torch.Tensor | None:
    """One fp32 ``[chunk, vocab]`` buffer reused by every chunk; ``None`` for half-precision weights, whose
    logits come from a half-precision GEMM and are upcast per chunk (on GPU the caching allocator reuses
    that memory anyway)."""
    if weight.dtype != torch.float32:
        return None
    return torch.empty((min(chunk_size, rows), weight.size(0)), dtype=torch.float32, device=weight.device)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        grad_h = torch.empty_like(hidden)
        need_w = ctx.needs_input_grad[1]  # False under LoRA: the LM head is frozen, skip a third of the work
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = _logits_buffer(hidden.size(0), weight, chunk_size)
        for start in range(0, hidden.size(0), chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            rows = torch.arange(t.numel(), device=t.device)
            logits = _chunk_logits(h, weight, buffer)
            target_logit = logits[rows, t]
            # Softmax in place over the one [chunk, vocab] buffer: max, subtract, exp, normalise.
            peak = logits.amax(dim=-1, keepdim=True)
            total = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            loss += (total.log() + peak).squeeze(1).sub(target_logit).sum()
            grad = logits.div_(total)  # d(sum CE)/d(logits) = softmax - one_hot, in fp32
            grad[rows, t] -= 1.0
            grad_lp = grad.to(weight.dtype)
            grad_h[start : start + chunk_size] = grad_lp @ weight
            if need_w and weight.dtype == torch.float32:
                grad_w.addmm_(grad_lp.t(), h)
            elif need_w:  # bf16 tensor-core GEMM (fp32 accumulation inside), chunks summed in fp32
                grad_w += (grad_lp.t() @ h).float()
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
        chunk_size: supervised tokens per LM-head chunk; peak extra memory ~ ``chunk_size × vocab × 4`` bytes.

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
    buffer = _logits_buffer(t.numel(), weight, chunk_size)  # not for bf16: that would waste 0.6 GB at 1,024
    for start in range(0, t.numel(), chunk_size):
        logits = _chunk_logits(h[start : start + chunk_size], weight, buffer)
        tc = t[start : start + chunk_size]
        loss += torch.nn.functional.cross_entropy(logits, tc, reduction="sum")
        correct += (logits.argmax(-1) == tc).sum()
    return loss, count, correct
