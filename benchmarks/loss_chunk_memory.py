"""Peak memory of the chunked LM-head loss: ``memory.chunked_loss_bytes`` vs what ``training/loss.py`` allocates, CPU.

Each case runs forward + backward of the loss's autograd function on leaf ``[tokens, hidden]`` rows and a
``[vocab, hidden]`` weight in a fresh process (``tests/memory_probe.py``: the rise of the peak RSS over the
RSS before the call, glibc's mmap threshold fixed so that every large tensor is its own mapping). Two
implementations side by side:

- new: ``medsft_lightning.training.loss._ChunkedLinearCE`` (``_ChunkBuffers``: one fp32 logits buffer, one buffer of
  the weight dtype for the bf16 GEMM output / gradient copy, one ``[vocab, hidden]`` buffer for each
  chunk's bf16 LM-head gradient GEMM, added in place into the fp32 accumulator).
- old: the same function as it was before (``OldChunkedLinearCE`` below, verbatim): per chunk a fresh bf16
  logits tensor and its fp32 copy, a fresh bf16 gradient copy, and ``grad_w += (grad.T @ h).float()``
  (a bf16 and an fp32 ``[vocab, hidden]`` temporary on top of the accumulator).

Printed per case: the count (``chunked_loss_bytes`` minus the input rows, which exist before the call; plus
the CPU-only 4 MiB slice of the mixed-dtype add for bf16/fp16 weights), both measured peaks and the
seconds of the new call; then what the old and the new allocation come to for Qwen3-1.7B at the
configs/full.yaml settings (arithmetic from the terms these measurements confirm).

    python benchmarks/loss_chunk_memory.py            # ~30 s on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medsft_lightning.tools.memory import GIB, QWEN3_ARCHS, Arch, chunked_loss_bytes, precision_of  # noqa: E402
from medsft_lightning.training import loss  # noqa: E402
from tests.memory_probe import run_cases  # noqa: E402

MIB = 1024**2
CASES = [  # vocab, hidden, tokens, chunk, weight dtype
    (151_936, 256, 24, 8, "bfloat16"),
    (151_936, 64, 384, 128, "bfloat16"),
    (32_768, 512, 200, 64, "bfloat16"),
    (151_936, 64, 384, 128, "float16"),
    (151_936, 256, 24, 8, "float32"),
    (151_936, 64, 384, 128, "float32"),
]
PRECISION = {"bfloat16": "bf16-true", "float16": "16-true", "float32": "32-true"}


class OldChunkedLinearCE(torch.autograd.Function):
    """``loss._ChunkedLinearCE`` before ``_ChunkBuffers`` (2026-12-01), for the side-by-side figures."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        grad_h = torch.empty_like(hidden)
        need_w = ctx.needs_input_grad[1]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = None
        if weight.dtype == torch.float32:
            shape = (min(chunk_size, hidden.size(0)), weight.size(0))
            buffer = torch.empty(shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.size(0), chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            rows = torch.arange(t.numel(), device=t.device)
            if buffer is not None:
                logits = torch.mm(h, weight.t(), out=buffer[: h.size(0)])
            else:
                logits = (h @ weight.t()).float()
            target_logit = logits[rows, t]
            peak = logits.amax(dim=-1, keepdim=True)
            total = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            loss_sum += (total.log() + peak).squeeze(1).sub(target_logit).sum()
            grad = logits.div_(total)
            grad[rows, t] -= 1.0
            grad_lp = grad.to(weight.dtype)
            grad_h[start : start + chunk_size] = grad_lp @ weight
            if need_w and weight.dtype == torch.float32:
                grad_w.addmm_(grad_lp.t(), h)
            elif need_w:
                grad_w += (grad_lp.t() @ h).float()
        ctx.grad_h, ctx.grad_w = grad_h, grad_w.to(weight.dtype) if need_w else None
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        del ctx.grad_h, ctx.grad_w
        scaled_w = grad_w.mul_(grad_loss.to(grad_w.dtype)) if grad_w is not None else None
        return grad_h.mul_(grad_loss.to(grad_h.dtype)), scaled_w, None, None


def counted(vocab: int, hidden: int, tokens: int, chunk: int, dtype: str) -> int:
    """What the new code should raise the peak by: the count without the input rows, + the CPU add slice."""
    precision = PRECISION[dtype]
    arch = Arch(hidden, 1, 1, 1, hidden, hidden, vocab, True)
    rows = tokens * hidden * precision_of(precision).resid
    cpu_slice = loss._CPU_ADD_ELEMENTS * 4 if dtype != "float32" else 0
    return chunked_loss_bytes(arch, precision, tokens, chunk) - rows + cpu_slice


def qwen3_1p7b_lines() -> list[str]:
    """Old vs new allocation at configs/full.yaml (bf16-true, 8,192 tokens, chunk 1,024), from the terms."""
    arch = QWEN3_ARCHS["Qwen/Qwen3-1.7B"]
    cv, vh, rows = 1024 * arch.vocab_size, arch.vocab_size * arch.hidden_size, 2 * 8192 * arch.hidden_size * 2
    new = chunked_loss_bytes(arch, "bf16-true", 8192, 1024)
    # old: during a chunk's grad_w update 6·cV (fp32 logits + bf16 gradient) + 4·VH accumulator + 2·VH bf16
    # product + 4·VH fp32 copy; at a chunk boundary the previous chunk's 6·cV + the next one's 6·cV + 4·VH.
    old = max(6 * cv + 10 * vh, 12 * cv + 4 * vh) + rows
    return [f"Qwen3-1.7B, bf16-true, 8,192 tokens, chunk 1,024: count {new / GIB:.2f} GiB; new allocation "
            f"{new / GIB:.2f} GiB, old allocation {old / GIB:.2f} GiB (+{(old - new) / GIB:.2f} GiB not counted)"]


def main() -> None:
    cases = [dict(kind="loss", vocab=v, hidden=h, tokens=t, chunk=c, dtype=d) for v, h, t, c, d in CASES]
    new = run_cases(cases)
    old = run_cases([dict(case, impl="benchmarks.loss_chunk_memory:OldChunkedLinearCE") for case in cases])
    print(f"{'vocab':>8} {'hidden':>6} {'tokens':>6} {'chunk':>5} {'dtype':>8}  {'count':>9}  {'new':>9} "
          f"{'new-count':>9}  {'old':>9} {'old/count':>9}  {'new s':>6}")
    for case, n, o in zip(CASES, new, old, strict=True):
        want = counted(*case)
        print(f"{case[0]:>8,} {case[1]:>6} {case[2]:>6} {case[3]:>5} {case[4]:>8}  {want / MIB:>7.2f} M  "
              f"{n['extra'] / MIB:>7.2f} M {(n['extra'] - want) / MIB:>+7.2f} M  {o['extra'] / MIB:>7.2f} M "
              f"{o['extra'] / want:>8.2f}x  {n['seconds']:>6.2f}")
    print("(MiB; count = chunked_loss_bytes - input rows + the CPU-only 4 MiB add slice for bf16/fp16)")
    print(*qwen3_1p7b_lines(), sep="\n")


if __name__ == "__main__":
    main()
