"""The peak of the tensor memory a call allocates, counted at PyTorch's dispatcher: the same on every CPU.

:class:`PeakAllocations` sees every ATen op the call runs and each new storage an op returns (a view of an
existing storage is no new memory), and keeps a weak reference to each, so it knows the bytes alive after
every op; the largest sum is the peak. What it counts is what the code asks PyTorch for, not what a kernel
allocates inside: on a CPU whose bf16/fp16 matmuls upcast (AVX2, and fp16 on AVX-512 without AMX) the kernel's
fp32 copies are outside it, as they are on a GPU, where the kernels compute in the weight dtype. So it runs on
``meta`` tensors too (no data, no arithmetic): the real Qwen3-1.7B shapes in milliseconds.

>>> import torch
>>> with PeakAllocations() as seen:
...     a = torch.ones(1024, device="meta")   # 4 KiB
...     b = a.view(32, 32) * 2                # a view (nothing), then 4 KiB
...     del b
...     c = torch.zeros(256, device="meta")   # 1 KiB while a is alive
>>> seen.peak
8192
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakAllocations(TorchDispatchMode):
    """Counts the bytes of storages created inside the ``with`` block; ``peak`` is their largest live sum."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self._ours: dict[int, tuple[StorageWeakRef, int]] = {}  # storages created inside, alive or not
        self._theirs: dict[int, StorageWeakRef] = {}  # storages that existed before: inputs and their views

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self._ours:
                    self._theirs.setdefault(ref.cdata, ref)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self._ours and ref.cdata not in self._theirs:
                    self._ours[ref.cdata] = (ref, storage.nbytes())
        # Forget what was freed (its address may come back for a new storage).
        self._ours = {k: v for k, v in self._ours.items() if not v[0].expired()}
        self._theirs = {k: v for k, v in self._theirs.items() if not v.expired()}
        self.peak = max(self.peak, sum(n for _, n in self._ours.values()))
        return out
