"""Peak CPU memory of one call, measured in a fresh process (``tests/test_loss_memory.py``,
``tests/test_memory_disk.py``, ``benchmarks/loss_chunk_memory.py``).

A case's figure is the rise of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
over its RSS just before the call, the inputs already built and the kernels warmed up on a tiny problem.
The child runs with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every large
tensor is its own mapping, unmapped when freed: the RSS then follows the live tensors to a few pages.

    python tests/memory_probe.py '[{"kind": "loss", "vocab": 151936, "hidden": 64, "tokens": 384, "chunk": 128,
                                    "dtype": "bfloat16"}]'
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEW_LOSS = "medsft_lightning.training.loss:_ChunkedLinearCE"


def run_cases(cases: list[dict], timeout: float = 300) -> list[dict]:
    """Each case measured in order by one child process; each result is the case plus ``peak_extra``'s."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__)), json.dumps(cases)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset), bytes."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def peak_extra(call) -> dict:
    """``extra``: bytes by which ``call()`` raises the peak RSS above the RSS before it; ``seconds``."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    before, _ = _rss()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return {"extra": _rss()[1] - before, "seconds": round(seconds, 3)}


def _loss_case(case: dict) -> dict:
    import torch

    module, _, name = case.get("impl", NEW_LOSS).partition(":")
    function = getattr(importlib.import_module(module), name)
    dtype, gen = getattr(torch, case["dtype"]), torch.Generator().manual_seed(0)
    vocab, hidden, tokens = case["vocab"], case["hidden"], case["tokens"]
    weight = (torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.02).requires_grad_()
    rows = torch.randn(tokens, hidden, generator=gen, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    small_w, small_h = weight[:64].detach().requires_grad_(), rows[:4].detach().requires_grad_()
    function.apply(small_h, small_w, targets[:4] % 64, 2).backward()  # warm up: kernels, thread pools

    def call():
        function.apply(rows, weight, targets, case["chunk"]).backward()

    return peak_extra(call)


def _step_case(case: dict) -> dict:
    """One AdamW step after a first one (so the states exist): what the step allocates beyond them."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from medsft_lightning.training import optim

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**case["config"])).to(getattr(torch, case["dtype"]))
    params = list(model.parameters())
    kind = case["optimizer"]
    fused = {"fused": True, "for-loop": False, "foreach": None}.get(kind)
    opt = optim.adamw([{"params": params, "weight_decay": 0.01}], lr=1e-5, betas=(0.9, 0.999),
                      kahan=kind.startswith("optimi"), fused=fused)
    if kind == "foreach":  # PyTorch's non-fused default on CUDA; asked for by name on the CPU
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True)

    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return peak_extra(opt.step)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    results = []
    for case in json.loads(sys.argv[1]):
        measure = {"loss": _loss_case, "step": _step_case}[case["kind"]]
        results.append({**case, **measure(case)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
