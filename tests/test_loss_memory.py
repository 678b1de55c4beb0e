"""The chunked loss allocates what ``memory.chunked_loss_bytes`` counts, in every dtype, on any CPU.

Two measurements:

- **At the dispatcher** (:class:`tests.allocations.PeakAllocations`): the peak of the tensors the loss asks
  PyTorch for, forward + backward, in bf16, fp16 and fp32, on ``meta`` tensors at the real Qwen3-1.7B shapes
  and on CPU tensors at a small one. This is what a GPU allocates (its kernels compute in the weight dtype),
  and it does not depend on the CPU: it must equal the estimate to the last few KiB (scalars, indices).
- **In the process's RSS** (``tests/memory_probe.py``, a fresh process per batch of cases), fp32 only. Each
  case's rise of the peak RSS over the RSS before the call; shapes with either the ``[vocab, hidden]`` terms
  (hidden 256, chunk 8) or the ``[chunk, vocab]`` terms (hidden 64, chunk 128) dominating. Tolerance 2% + 4 MiB:
  allocator pages, library scratch, the O(chunk × hidden) temporaries.

Why no bf16/fp16 RSS case: a CPU without native bf16 matmuls (AVX2: AMD EPYC and older Xeons; fp16 also on
AVX-512 without AMX) upcasts inside its kernels into fp32 temporaries that neither the loss nor a GPU allocates:
measured 377.8 MiB against the 233.5 MiB estimate for bf16 at hidden 256 (AVX2), 204.0 against 171.0 for fp16
at hidden 64 (AVX2 and this AVX-512 machine alike), while AVX-512-bf16 matched. ``benchmarks/loss_chunk_memory.py``
still measures those on demand. Before ``_ChunkBuffers`` the bf16 peak was 40-65% above the count (a fresh bf16 +
fp32 copy of the ``[vocab, hidden]`` product per chunk, a chunk's logits alive while the next one's were
computed): the dispatcher count sees both.
"""

from __future__ import annotations

import pytest
import torch

from medsft_lightning.tools.memory import Arch, chunked_loss_bytes, precision_of
from medsft_lightning.training import loss
from tests.allocations import PeakAllocations
from tests.memory_probe import run_cases

MIB = 1024**2
RSS_CASES = [  # vocab, hidden, tokens, chunk: fp32
    (151_936, 256, 24, 8),
    (151_936, 64, 384, 128),
]
PRECISION = {"bfloat16": "bf16-true", "float16": "16-true", "float32": "32-true"}
DISPATCH_CASES = [  # vocab, hidden, tokens, chunk, device
    (151_936, 2048, 8192, 1024, "meta"),  # Qwen3-1.7B, a batch of 4 × 2,048 supervised tokens
    (151_936, 2048, 1500, 1024, "meta"),  # a last chunk shorter than the rest
    (151_936, 256, 24, 8, "meta"),
    (4_096, 64, 40, 16, "cpu"),  # real arithmetic, small enough for any CPU in any dtype
]


def expected_bytes(vocab: int, hidden: int, tokens: int, chunk: int, dtype: str, cpu_add: bool) -> int:
    """``chunked_loss_bytes`` less the supervised rows themselves (they exist before the call); ``cpu_add``: plus
    the CPU-only temporary of the mixed-dtype add, one 4 MiB slice (inside a kernel: RSS sees it, the dispatcher
    does not)."""
    precision = PRECISION[dtype]
    arch = Arch(hidden, 1, 1, 1, hidden, hidden, vocab, True)  # only vocab and hidden enter the loss
    expected = chunked_loss_bytes(arch, precision, tokens, chunk) - tokens * hidden * precision_of(precision).resid
    if cpu_add and dtype != "float32":
        expected += loss._CPU_ADD_ELEMENTS * 4
    return expected


@pytest.mark.parametrize("dtype", PRECISION)
@pytest.mark.parametrize("case", DISPATCH_CASES, ids=lambda c: f"V{c[0]}-H{c[1]}-T{c[2]}-c{c[3]}-{c[4]}")
def test_chunked_loss_allocates_the_estimate_at_the_dispatcher(case, dtype):
    vocab, hidden, tokens, chunk, device = case
    gen = torch.Generator().manual_seed(0)
    kind = getattr(torch, dtype)
    if device == "meta":
        weight = torch.empty(vocab, hidden, dtype=kind, device="meta").requires_grad_()
        rows = torch.empty(tokens, hidden, dtype=kind, device="meta").requires_grad_()
        targets = torch.zeros(tokens, dtype=torch.long, device="meta")
    else:
        weight = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(kind).requires_grad_()
        rows = torch.randn(tokens, hidden, generator=gen).to(kind).requires_grad_()
        targets = torch.randint(0, vocab, (tokens,), generator=gen)
    with PeakAllocations() as seen:
        loss._ChunkedLinearCE.apply(rows, weight, targets, chunk).backward()
    expected = expected_bytes(vocab, hidden, tokens, chunk, dtype, cpu_add=False)
    assert 0 <= seen.peak - expected <= 64 * 1024, (
        f"allocated {seen.peak / MIB:.3f} MiB, chunked_loss_bytes {expected / MIB:.3f} MiB")


@pytest.fixture(scope="module")
def measured() -> dict[tuple, int]:
    cases = [dict(kind="loss", vocab=v, hidden=h, tokens=t, chunk=c, dtype="float32") for v, h, t, c in RSS_CASES]
    return {(r["vocab"], r["hidden"], r["tokens"], r["chunk"]): r["extra"] for r in run_cases(cases)}


@pytest.mark.parametrize("case", RSS_CASES, ids=lambda c: f"V{c[0]}-H{c[1]}-T{c[2]}-c{c[3]}-float32")
def test_chunked_loss_peak_rss_equals_the_estimate_in_fp32(measured, case):
    expected = expected_bytes(*case, "float32", cpu_add=True)
    got = measured[case]
    assert abs(got - expected) <= 0.02 * expected + 4 * MIB, (
        f"measured {got / MIB:.2f} MiB, chunked_loss_bytes {expected / MIB:.2f} MiB")
