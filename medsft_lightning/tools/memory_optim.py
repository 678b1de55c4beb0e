"""``medsft memory``'s optimizer terms: the state each ``model.optimizer`` choice keeps per parameter tensor, what
one step allocates beyond it, and what a GPU adds beyond tensors. Pure arithmetic, as ``memory.py``, on a model's
list of parameter tensors (``memory.param_tensors``: values and dimensions of each distinct tensor).

State per tensor of n values whose weights take p bytes (what the libraries allocate; measured on real Qwen3
layers and the tiny model by ``tests/test_memory_state.py``, on every Qwen3-1.7B tensor shape by
``benchmarks/optimizer_state_memory.py``):

- ``adamw`` (torch AdamW): exp_avg and exp_avg_sq in the weights' dtype, 2·n·p.
- ``kahan`` (torch-optimi, bf16/fp16 weights): 2·n·p + a Kahan compensation n·p, fp32 (n·4) for 1-D tensors
  (``optim.adamw`` keeps norm weights' compensation in fp32). On fp32 weights it is ``adamw``.
- ``adamw8bit_sr`` (torchao AdamW8bit): a tensor of at least 4,096 values, a multiple of 256, keeps each moment as
  n uint8 codes + n/256 fp32 block scales + its own 256-entry fp32 code map (n + n/64 + 1,024 bytes); any other
  tensor (norm weights) 2·n·p. Checkpoints store codes and scales, not the code maps.

Step temporaries, L the largest tensor (the embedding): PyTorch's fused AdamW none, foreach N·p, for-loop 2·L·p;
torch-optimi with Triton none, its for-loop L·p; torchao compiled (``torch.compile`` of its per-tensor step, its
CUDA path) 8 B per value of L (the new fp32 moments, materialised for the block-wise re-quantisation: measured
8.0 B/value with Inductor on the CPU; not measured with Triton), eagerly (medsft's CPU path) 57 B per value of L
for bf16 weights, 53 for fp32 (int64 code searches). Measured by peak RSS (``tests/test_memory_disk.py``;
the torchao figures by ``benchmarks/optimizer_state_memory.py``).

What a GPU adds beyond the tensors (allowances, not measured here: no GPU on the development machines): the CUDA
context with cuBLAS and kernels, 1 GiB (typically 0.5-1 GiB); backward's temporary buffers and the caching
allocator's slack, 5% of the tensors (measured H200 peaks of ``max_memory_allocated`` ran 2-5% above the tensor
count, benchmarks/README.md); NCCL's communication buffers under DDP/FSDP on several GPUs, 0.5 GiB per process.
"""

from __future__ import annotations

GIB = 1024**3
STEPS = ("fused", "foreach", "for-loop", "optimi-triton", "optimi-for-loop", "torchao", "torchao-eager")
LOWBIT_MIN, LOWBIT_BLOCK, CODE_MAP = 4096, 256, 256  # torchao: only tensors this large are quantised
CUDA_CONTEXT, SLACK_SHARE, NCCL_BUFFERS = 1 * GIB, 0.05, GIB // 2


def choice_of(step: str) -> str:
    """The ``model.optimizer`` choice a step kind belongs to."""
    return "kahan" if step.startswith("optimi") else "adamw8bit_sr" if step.startswith("torchao") else "adamw"


def tensor_state_bytes(choice: str, numel: int, ndim: int, p: int, on_disk: bool = False) -> tuple[int, int]:
    """(moments, compensation) bytes of one parameter tensor's optimizer state (module docstring)."""
    if choice == "adamw8bit_sr" and numel >= LOWBIT_MIN and numel % LOWBIT_BLOCK == 0:
        per_moment = numel + numel // LOWBIT_BLOCK * 4 + (0 if on_disk else CODE_MAP * 4)
        return 2 * per_moment, 0
    compensation = (numel * (4 if ndim < 2 else p)) if choice == "kahan" and p < 4 else 0
    return 2 * numel * p, compensation


def state_bytes(tensors: list[tuple[int, int]], p: int, choice: str, shard: int = 1,
                on_disk: bool = False) -> tuple[int, int]:
    """(moments, compensation) bytes of all ``tensors`` (``(values, dims)`` each) under ``choice``."""
    parts = [tensor_state_bytes(choice, n, ndim, p, on_disk) for n, ndim in tensors]
    return sum(m for m, _ in parts) // shard, sum(c for _, c in parts) // shard


def step_temp_bytes(tensors: list[tuple[int, int]], p: int, step: str, shard: int = 1) -> int:
    """What one optimizer step allocates beyond its states (module docstring); ``step`` in STEPS."""
    largest, total = max(n for n, _ in tensors) // shard, sum(n for n, _ in tensors) // shard
    temps = {"fused": 0, "foreach": total * p, "for-loop": 2 * largest * p, "optimi-triton": 0,
             "optimi-for-loop": largest * p, "torchao": 8 * largest, "torchao-eager": (57 if p == 2 else 53) * largest}
    if step not in temps:
        raise ValueError(f"optimizer step {step!r}: use one of {', '.join(STEPS)}")
    return temps[step]


def device_overhead(tensors: int, gpu: bool, processes: int) -> dict[str, int]:
    """What a GPU adds beyond the tensors (module docstring); nothing on the CPU."""
    if not gpu:
        return {"cuda_context": 0, "slack": 0, "nccl": 0}
    return {"cuda_context": CUDA_CONTEXT, "slack": int(SLACK_SHARE * tensors),
            "nccl": NCCL_BUFFERS if processes > 1 else 0}


def parse_size(text: str) -> int:
    """``24GiB``, ``24G`` or ``24`` (GiB), ``24GB`` (10^9 bytes), ``16384MiB`` → bytes; ``ValueError`` otherwise."""
    units = {"gib": GIB, "g": GIB, "": GIB, "gb": 10**9, "mib": 1024**2, "m": 1024**2, "mb": 10**6}
    value = str(text).strip().lower().replace(" ", "")
    number = value.rstrip("gimb")
    unit = value[len(number):]
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"{text!r}: use a size such as 24GiB, 24GB, 16384MiB or 24 (GiB), or auto") from None
    if size <= 0:
        raise ValueError(f"{text!r}: use a positive size")
    return int(size)
