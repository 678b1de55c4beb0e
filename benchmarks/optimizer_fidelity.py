"""How close each ``model.optimizer`` choice on bf16 weights stays to fp32 master weights with fp32 moments.

Every arm gets the same weights and the same sequence of gradients, so the differences are the optimizer's
arithmetic alone (no training loop, no model): ``--steps`` AdamW steps (betas 0.9 / 0.999, eps 1e-8, no weight
decay) at each ``--lrs``, built with medsft's own ``optim.build`` (torchao's 8-bit step runs compiled, its CUDA
path's code, via ``torch.compile`` with Inductor on the CPU: eager it is ~15x slower here).

Weights, shaped like a slice of Qwen3-1.7B: a 256 x 2,048 projection matrix from N(0, 0.02) (Qwen3's
initializer range), and a 2,048-value RMSNorm weight at 1 + N(0, 0.02) (1-D: bf16 moments in every choice, fp32
Kahan compensation under kahan). bf16 arms start from their bf16 rounding.

Gradients (synthetic, documented, not recorded from a model): per element ``g_t = s_row · (mu + e_t) · 1e-4``
with ``e_t ~ N(0, 1)`` fresh every step, ``mu ~ N(0, 0.3^2)`` fixed per element (a weak signal under per-step noise,
as in small-batch fine-tuning) and ``s_row`` log-normal (sigma 1) per row, so rows differ by orders of magnitude
as they do between a model's tensors and rows; the same for the norm weight.

Printed per arm and LR: the drift along fp32's drift as a share of it (``sum(d·d_ref) / sum(d_ref^2)``, all
weights; 1.00 = fp32's move), the median and 10th / 90th percentiles over all weights of each bias-corrected
moment's ratio to fp32's (``m / (1 - b1^t)``, ``v / (1 - b2^t)``; torch-optimi stores them corrected already;
8-bit moments dequantized), the bytes of optimizer state per parameter (the real state tensors: 8-bit codes,
scales and code maps; Kahan compensations) and the seconds per step after the first 3 (CPU, this machine).

    python benchmarks/optimizer_fidelity.py                 # 1,000 steps at lr 1e-5 and 1e-4, ~10 min on 2 cores
    python benchmarks/optimizer_fidelity.py --steps 200 --lrs 1e-5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import medsft_lightning  # noqa: E402,F401  (filters torchao's CPU-build log lines)
from medsft_lightning.training import optim  # noqa: E402
from medsft_lightning.training.optim_lowbit import state_bytes  # noqa: E402

BETAS = (0.9, 0.999)
# arm: (medsft choice, weight dtype, note); "fp32" is the reference
ARMS = {
    "fp32": ("adamw", torch.float32, "fp32 master weights + fp32 moments (torch AdamW): the reference"),
    "adamw8bit_sr": ("adamw8bit_sr", torch.bfloat16, "torchao AdamW8bit, bf16 stochastic rounding"),
    "kahan": ("kahan", torch.bfloat16, "torch-optimi AdamW + Kahan, bf16 moments"),
    "adamw": ("adamw", torch.bfloat16, "torch AdamW on bf16 weights, round to nearest"),
    "sr_bf16_moments": ("torchao_sr", torch.bfloat16, "not a choice: torchao _AdamW, bf16 moments + stochastic "
                        "rounding (shows what the 8-bit moments add)"),
}


def problem(rows: int = 256, cols: int = 2048, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(rows, cols, generator=gen) * 0.02, "norm": 1 + torch.randn(cols, generator=gen) * 0.02,
            "mu": [torch.randn(rows, cols, generator=gen) * 0.3, torch.randn(cols, generator=gen) * 0.3],
            "scale": [torch.exp(torch.randn(rows, 1, generator=gen)), torch.exp(torch.randn(1, generator=gen))]}


def gradient(prob: dict, index: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1_000_003 * index + step)
    mu, scale = prob["mu"][index], prob["scale"][index]
    return scale * (mu + torch.randn(mu.shape, generator=gen)) * 1e-4


def build(arm: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    choice = ARMS[arm][0]
    groups = [{"params": params, "weight_decay": 0.0}]
    if choice == "torchao_sr":
        from medsft_lightning.training.optim_lowbit import torchao_optim

        return torchao_optim()._AdamW(groups, lr=lr, betas=BETAS, eps=1e-8, bf16_stochastic_round=True)
    opt = optim.build(choice, groups, lr=lr, betas=BETAS, fused=False)
    opt.compile_on_cpu = True  # torchao: its compiled step (ignored by the others)
    return opt


def moments(arm: str, opt, p: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected first and second moments, fp32 (8-bit ones dequantized)."""
    state = opt.state[p]
    m, v = (state[k].dequantize() if hasattr(state[k], "dequantize") else state[k] for k in ("exp_avg", "exp_avg_sq"))
    m, v = m.float(), v.float()
    if ARMS[arm][0] != "kahan":  # torch-optimi keeps them bias-corrected already (its "debiased betas")
        m, v = m / (1 - BETAS[0] ** steps), v / (1 - BETAS[1] ** steps)
    return m.flatten(), v.flatten()


def run_arm(arm: str, lr: float, steps: int, prob: dict) -> dict:
    torch.manual_seed(0)  # stochastic rounding's random bits
    dtype = ARMS[arm][1]
    start = [prob["w"].to(dtype), prob["norm"].to(dtype)]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    opt = build(arm, params, lr)
    times = []
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = gradient(prob, i, step).to(dtype)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    drift = torch.cat([(p.detach().float() - s.float()).flatten() for p, s in zip(params, start)])
    m, v = zip(*(moments(arm, opt, p, steps) for p in params))
    n = sum(p.numel() for p in params)
    return {"drift": drift, "m": torch.cat(m), "v": torch.cat(v), "s_step": sum(times[3:]) / max(1, len(times) - 3),
            "state_b_per_param": sum(state_bytes(opt.state[p]) for p in params) / n}


def quantiles(ratio: torch.Tensor) -> list[float]:
    return [float(x) for x in ratio.quantile(torch.tensor([0.1, 0.5, 0.9]))]


def compare(results: dict[str, dict]) -> dict[str, dict]:
    ref = results["fp32"]
    out = {}
    for arm, r in results.items():
        out[arm] = {"along": float((r["drift"].double() * ref["drift"]).sum() / ref["drift"].double().pow(2).sum()),
                    "m": quantiles(r["m"] / ref["m"]), "v": quantiles(r["v"] / ref["v"]),
                    "state_b_per_param": r["state_b_per_param"], "s_step": r["s_step"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    arms = ["fp32"] + [a for a in args.arms if a != "fp32"]
    prob = problem()
    table = {}
    print(f"optimizer_fidelity: torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
          f"weights 256 x 2,048 + 2,048 (norm), synthetic gradients (module docstring)", flush=True)
    for lr in args.lrs:
        results = {}
        for arm in arms:
            print(f"  lr {lr:g}: {arm} ...", file=sys.stderr, flush=True)
            results[arm] = run_arm(arm, lr, args.steps, prob)
        table[f"{lr:g}"] = compare(results)
        print(f"\nlr {lr:g}, {args.steps} steps        drift/fp32   m p10    m p50    m p90    v p10    v p50    "
              "v p90  state B/param   s/step")
        for arm, r in table[f"{lr:g}"].items():
            print(f"  {arm:<18} {r['along']:10.4f} " + " ".join(f"{x:8.3f}" for x in r["m"] + r["v"])
                  + f" {r['state_b_per_param']:14.2f} {r['s_step']:8.4f}")
    print("\n" + "\n".join(f"  {arm}: {ARMS[arm][2]}" for arm in arms))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
