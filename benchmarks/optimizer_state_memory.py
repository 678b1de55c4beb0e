"""Optimizer state of every ``model.optimizer`` choice on Qwen3-1.7B's real tensors, measured, beside ``medsft memory``.

The whole 1.7B model with fp32 master weights and moments would need ~27 GB, more than a development machine has,
so this builds the real Qwen3-1.7B config (hidden 2048, 16 heads, 8 KV heads, head_dim 128, intermediate 6144,
vocab 151,936, tied embeddings; written here, no download) with **one** decoder layer, random weights: the
embedding / tied LM head, one layer and the final norm are every distinct tensor shape of the model, and the 28
real layers are identical. Each choice runs in its own process: weights in the dtype its precision gives, two
real optimizer steps through ``MedSFTModule.configure_optimizers`` (gradients set by hand: no forward, so no bf16
matmul on the CPU), then the bytes of every state tensor (``optim_lowbit.state_bytes``: 8-bit codes, scales and code
maps; Kahan compensations; not the scalar step counters) are recorded per tensor. The model's total is the
embedding's + the final norm's + 28 × the layer's, exactly. Printed per choice: bytes of state per parameter and
GiB for Qwen3-1.7B, measured and as ``medsft memory`` counts them, and the peak RSS rise of the second step
(the step's temporaries) against ``memory_optim``'s rule for the measured 1-layer model. Peak RSS per process
stays under ~9 GB (measured 3.3-8.7 GB; the fp32 reference's is the largest).

torchao's 8-bit step runs compiled here (``torch.compile``, Inductor on the CPU; its CUDA path's code): eager, its
temporaries on the 311 M-value embedding would take ~17 GB.

    python benchmarks/optimizer_state_memory.py          # ~5-10 min on 2 cores (Inductor compiles each shape once)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_1P7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=1,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
LAYERS = 28
ARMS = {  # name: (precision, model.optimizer, how its step runs here: memory_optim's step kind for the CPU)
    "adamw8bit_sr": ("bf16-true", "adamw8bit_sr", "torchao"),
    "kahan": ("bf16-true", "kahan", "optimi-for-loop"),
    "adamw": ("bf16-true", "adamw", "fused"),
    "fp32 master + moments": ("bf16-mixed", "adamw", "foreach"),  # medsft's AdamW under *-mixed: foreach
}
RESULT = "STATE_MEMORY_RESULT "


def child(arm: str) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import medsft_lightning  # noqa: F401  (filters torchao's CPU-build log lines)
    from medsft_lightning.training.module import MedSFTModule
    from medsft_lightning.training.optim_lowbit import adamw8bit_sr_class, state_bytes

    precision, choice, _ = ARMS[arm]
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32  # bf16-mixed: fp32 master weights
    adamw8bit_sr_class().compile_on_cpu = True
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_1P7B))
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()  # to_empty gives the LM head storage of its own: tied again, as from_pretrained leaves it
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    module = MedSFTModule("unused", optimizer=choice)
    module.model = model

    class Trainer:  # what configure_optimizers reads
        estimated_stepping_batches = 10
        precision = ARMS[arm][0]

    module._trainer = Trainer()
    opt = module.configure_optimizers()["optimizer"]
    peaks = []
    for step in range(2):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3 * (step + 1))
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        before, t0 = _rss()[0], time.perf_counter()
        opt.step()
        peaks.append({"rise": _rss()[1] - before, "s": time.perf_counter() - t0})
        for p in model.parameters():
            p.grad = None
    per_tensor = {name: [p.numel(), state_bytes(opt.state[p])] for name, p in model.named_parameters()}
    return {"arm": arm, "optimizer": type(opt).__name__, "per_tensor": per_tensor, "steps": peaks,
            "largest": max(p.numel() for p in model.parameters()), "peak_rss": _rss()[2]}


def _rss() -> tuple[int, int, int]:
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    kib = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
    return kib["VmRSS"], kib["VmHWM"], kib["VmHWM"]


def whole_model(per_tensor: dict[str, list[int]]) -> tuple[int, int]:
    """(parameters, state bytes) of the 28-layer model from the 1-layer one: the layer's tensors x 28."""
    params = state = 0
    for name, (numel, nbytes) in per_tensor.items():
        times = LAYERS if ".layers.0." in name else 1
        params, state = params + times * numel, state + times * nbytes
    return params, state


def main() -> None:
    from dataclasses import replace

    from medsft_lightning.tools.memory import GIB, QWEN3_ARCHS, estimate

    arch = QWEN3_ARCHS["Qwen/Qwen3-1.7B"]
    print(f"optimizer_state_memory: Qwen3-1.7B's tensors (1 real layer x {LAYERS}), 2 steps per choice, "
          f"{os.cpu_count()} CPUs", flush=True)
    print(f"{'choice':<24}{'optimizer':>14}{'measured B/param':>18}{'memory B/param':>16}{'measured GiB':>14}"
          f"{'memory GiB':>12}{'step temp GiB':>15}{'rule GiB':>10}{'peak RSS':>10}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    for arm, (precision, _, step) in ARMS.items():
        proc = subprocess.run([sys.executable, __file__, "--child", arm], capture_output=True, text=True, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
        if proc.returncode or not lines:
            print(f"{arm}: FAILED\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(lines[-1][len(RESULT):])
        params, state = whole_model(r["per_tensor"])
        est = estimate(arch, 1, 16, precision, optimizer=step)
        counted = est["optimizer"] + est["kahan"]
        rule = estimate(replace(arch, num_hidden_layers=1), 1, 16, precision, optimizer=step)["optimizer_step_temp"]
        print(f"{arm:<24}{r['optimizer']:>14}{state / params:>18.4f}{counted / params:>16.4f}{state / GIB:>14.3f}"
              f"{counted / GIB:>12.3f}{r['steps'][1]['rise'] / GIB:>15.2f}{rule / GIB:>10.2f}"
              f"{r['peak_rss'] / 1e9:>9.1f}G", flush=True)
        assert params == est["params"], (params, est["params"])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(RESULT + json.dumps(child(sys.argv[2])), flush=True)
    else:
        main()
