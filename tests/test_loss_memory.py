"""The chunked loss allocates what ``memory.chunked_loss_bytes`` counts: a call's peak CPU memory, measured.

Each case runs forward + backward of ``loss._ChunkedLinearCE`` in a fresh process (``tests/memory_probe.py``:
rise of the peak RSS over the RSS before the call). Shapes: the real 151,936-row vocabulary with either the
``[vocab, hidden]`` terms (hidden 256, chunk 8) or the ``[chunk, vocab]`` terms (hidden 64, chunk 128)
dominating, in bf16, fp16 and fp32; each call takes well under a second on a 2-core CPU.

Tolerance: 2% + 4 MiB. Over these and other shapes (``benchmarks/loss_chunk_memory.py``) the measured peak
stayed 0.0-4.4 MiB above the count (allocator pages, library scratch, the O(chunk × hidden) temporaries).
Before ``_ChunkBuffers`` the bf16 peak was 40-65% above the same count (+146 MiB and +91 MiB on the first
two cases: a fresh bf16 + fp32 copy of the ``[vocab, hidden]`` product per chunk, and a chunk's logits
still alive while the next chunk's were computed).
"""

from __future__ import annotations

import pytest

from medsft_lightning.tools.memory import Arch, chunked_loss_bytes, precision_of
from medsft_lightning.training import loss
from tests.memory_probe import run_cases

MIB = 1024**2
CASES = [  # vocab, hidden, tokens, chunk, weight dtype
    (151_936, 256, 24, 8, "bfloat16"),
    (151_936, 64, 384, 128, "bfloat16"),
    (151_936, 64, 384, 128, "float16"),
    (151_936, 256, 24, 8, "float32"),
]
PRECISION = {"bfloat16": "bf16-true", "float16": "16-true", "float32": "32-true"}


@pytest.fixture(scope="module")
def measured() -> dict[tuple, int]:
    cases = [dict(kind="loss", vocab=v, hidden=h, tokens=t, chunk=c, dtype=d) for v, h, t, c, d in CASES]
    return {(r["vocab"], r["hidden"], r["tokens"], r["chunk"], r["dtype"]): r["extra"] for r in run_cases(cases)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"V{c[0]}-H{c[1]}-T{c[2]}-c{c[3]}-{c[4]}")
def test_chunked_loss_peak_equals_the_estimate(measured, case):
    vocab, hidden, tokens, chunk, dtype = case
    precision = PRECISION[dtype]
    arch = Arch(hidden, 1, 1, 1, hidden, hidden, vocab, True)  # only vocab and hidden enter the loss
    # The supervised rows themselves exist before the call; the probe's baseline holds them.
    expected = chunked_loss_bytes(arch, precision, tokens, chunk) - tokens * hidden * precision_of(precision).resid
    if dtype != "float32":  # CPU only: the mixed-dtype add of the LM-head gradient, one 4 MiB slice at a time
        expected += loss._CPU_ADD_ELEMENTS * 4
    got = measured[case]
    assert abs(got - expected) <= 0.02 * expected + 4 * MIB, (
        f"measured {got / MIB:.2f} MiB, chunked_loss_bytes {expected / MIB:.2f} MiB")
