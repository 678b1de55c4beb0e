"""``medsft eval``: the fine-tuned model and its base on medical multiple-choice benchmarks, and their thinking modes.

::

    medsft eval runs/demo/version_0/hf_model --base medsft:tiny-qwen3
    medsft eval --run runs/qwen3-1.7b-medical/version_0 --data ceval-medical cmmlu-medical medmcqa
    medsft eval runs/x/hf_model --base Qwen/Qwen3-1.7B --data ~/data/CMB --layout cmb --scorer generate

Each model in turn is loaded, scored by ``loglik`` (each option's log-likelihood after the chat template's
non-thinking prompt: ``acc`` and ``acc_norm``) and/or ``generate`` (thinking on with a budget, the letters read
after ``</think>``), put through the thinking-mode checks, and freed. A SOURCE is a file or folder of questions,
``medsft:mcq-sample`` (the default: 24 questions written for medsft), a benchmark name or a ModelScope id
(:mod:`~medsft_lightning.data.benchmarks`). The files :mod:`~medsft_lightning.tools.eval_io` lists go to
``--output_dir`` (default: ``RUN/eval`` for a run's model, else ``./eval``); with a run, its ``medsft compare``
report gets the section too. What the figures mean: docs/judging.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from medsft_lightning.data.benchmarks import BENCHMARKS, MCQ_SAMPLE, load_benchmark
from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT
from medsft_lightning.data.mcq_layouts import LAYOUTS
from medsft_lightning.data.sources import DataError
from medsft_lightning.generation.generate import Generation
from medsft_lightning.tools import eval_io
from medsft_lightning.tools.eval_run import Settings, Side, evaluate_model, summarize
from medsft_lightning.tools.eval_stats import ALL
from medsft_lightning.tools.models import ModelError

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """The command line cannot work: missing models, values out of range, flags that do not go together."""


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="medsft eval", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("model", nargs="?", help="the fine-tuned model: an exported folder (runs/…/hf_model), a .ckpt or a hub id "
                                 "(default with --run: RUN/hf_model)")
    add("--base", help="the base model scored beside it (default with --run: the run's model.model_name_or_path)")
    add("--run", help="a medsft fit run folder: its hf_model, base model, system prompt; output to RUN/eval")
    add("--data", nargs="+", default=[MCQ_SAMPLE], metavar="SOURCE",
        help=f"question files/folders, {MCQ_SAMPLE} (default), a benchmark ({', '.join(BENCHMARKS)}) or a "
             "ModelScope dataset id")
    add("--layout", choices=LAYOUTS, help="the layout of the files (default: recognised from their fields)")
    add("--split", help="the split to read where file names carry one (default: the benchmark's evaluation split)")
    add("--subjects", default="medical", help="'medical' (C-Eval's and CMMLU's medical subjects), 'all', or "
                                              "comma-separated subject names")
    add("--scorer", choices=["loglik", "generate", "both"], default="both",
        help="loglik: each option's log-likelihood without thinking (acc, acc_norm); generate: thinking on, the "
             "letters read after </think> (and the thinking-mode checks); both (default)")
    add("--output_dir", help="where the files go (default: RUN/eval, else ./eval)")
    add("--limit", type=int, help="score only the first N questions of each SOURCE")
    add("--think_checks", type=int, default=16, help="questions for the thinking-mode checks (the first N, taken in "
                                                     "turn from each SOURCE); 0: none")
    add("--max_think_tokens", type=int, default=1024, help="thinking budget; then </think> is forced")
    add("--max_answer_tokens", type=int, default=256, help="tokens for the answer after the think")
    add("--batch_size", type=int, default=8, help="sequences per forward pass / prompts generated together")
    add("--greedy", action="store_true", help="decode greedily (default: the model's sampling settings)")
    add("--temperature", type=float, help="default: the model's generation config, else Qwen3's 0.6")
    add("--top_p", type=float, help="default: the model's generation config, else Qwen3's 0.95")
    add("--top_k", type=int, help="default: the model's generation config, else Qwen3's 20")
    add("--seed", type=int, default=0, help="sampling seed and the bootstrap's")
    add("--system_prompt", help="system turn (default: the run's data.system_prompt, else medsft's; '' for none)")
    add("--engine", choices=["hf", "vllm"], default="hf", help="generate here (hf) or with vLLM's offline engine")
    add("--vllm_python", help="--engine vllm: the Python that has vLLM (default: $MEDSFT_VLLM_PYTHON)")
    add("--vllm_batch", type=int, default=64, help="--engine vllm: prompts per vLLM generate call")
    add("--endpoint", metavar="URL", help="the fine-tuned model served by an OpenAI-compatible server (generate only)")
    add("--served_model", metavar="NAME", help="the model to ask at --endpoint (default: the first listed)")
    add("--base_endpoint", metavar="URL", help="the base model served by an OpenAI-compatible server")
    add("--base_served_model", metavar="NAME", help="the model to ask at --base_endpoint")
    add("--api_key", help="API key for the endpoints (default: $OPENAI_API_KEY, else EMPTY); never saved")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    add("--swanlab", choices=["auto", "online", "offline", "local", "disabled"], default="auto",
        help="log the figures to SwanLab (auto: online with a key, else offline files in OUTPUT_DIR/swanlog)")
    add("--swanlab_project", default="medsft", help="SwanLab project")
    return parser


def _run_config(run: Path) -> tuple[dict, dict]:
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"--run={str(run)!r}: no config.yaml in it (give a medsft fit run folder)")
    cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    data = cfg.get("data") or {}
    return cfg.get("model") or {}, data.get("init_args", data)


def resolve(args: argparse.Namespace) -> tuple[list[Side], Path | None, Path, Settings]:
    """The models, the run (given, or the parent of ``RUN/hf_model``), the output folder and the settings."""
    for flag in ("limit", "think_checks", "max_think_tokens", "max_answer_tokens", "batch_size", "vllm_batch"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "think_checks" else 1):
            raise EvalError(f"--{flag}={value}: use {'0' if flag == 'think_checks' else '1'} or more")
    if args.endpoint and args.model:
        raise EvalError("--endpoint replaces MODEL: give one of them")
    if args.base_endpoint and args.base:
        raise EvalError("--base_endpoint replaces --base: give one of them")
    run = Path(args.run) if args.run else None
    if run is None and args.model and Path(args.model).name == "hf_model" and (Path(args.model).parent
                                                                               / "config.yaml").is_file():
        run = Path(args.model).parent
    model, data = _run_config(run) if run is not None else ({}, {})
    tuned = args.model or (str(run / "hf_model") if args.run and not args.endpoint else None)
    if not tuned and not args.endpoint:
        raise EvalError("give MODEL (an exported hf_model folder, a .ckpt, a hub id), --run RUN or --endpoint URL")
    sides = [Side("tuned", args.endpoint or tuned, "--endpoint" if args.endpoint else "MODEL",
                  served_model=args.served_model)]
    base = args.base_endpoint or args.base or model.get("model_name_or_path")
    if base:
        sides.insert(0, Side("base", base, "--base_endpoint" if args.base_endpoint else "--base",
                             None if args.base else model.get("model_revision"), args.base_served_model))
    out = Path(args.output_dir) if args.output_dir else (run / "eval" if run is not None else Path("eval"))
    system = args.system_prompt if args.system_prompt is not None else data.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    generation = Generation(do_sample=False if args.greedy else None, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    settings = Settings(scorers=("loglik", "generate") if args.scorer == "both" else (args.scorer,),
                        system_prompt=system or None, max_think_tokens=args.max_think_tokens,
                        max_answer_tokens=args.max_answer_tokens, think_checks=args.think_checks,
                        batch_size=args.batch_size, generation=generation, engine=args.engine, device=args.device,
                        cache_dir=model.get("cache_dir"), vllm_python=args.vllm_python, vllm_batch=args.vllm_batch,
                        api_key=args.api_key)
    return sides, run, out, settings


def evaluate(args: argparse.Namespace) -> tuple[dict, Path]:
    """Run everything ``args`` describe and write the files; returns ``(summary, output folder)``."""
    sides, run, out, settings = resolve(args)
    subjects = args.subjects if args.subjects in ("medical", "all") else [s.strip() for s in args.subjects.split(",")]
    benchmarks = []
    for source in args.data:
        bench = load_benchmark(source, args.layout, args.split, subjects, cache_dir=settings.cache_dir)
        bench.questions = bench.questions[: args.limit]
        benchmarks.append(bench)
    answers, thinking, models = [], [], {}
    for side in sides:
        got, checks, models[side.key] = evaluate_model(side, benchmarks, settings)
        answers += got
        thinking += checks
    summary = summarize(models, benchmarks, settings, answers, thinking)
    files = eval_io.write_outputs(out, summary, answers, thinking)
    eval_io.log_swanlab(summary, args.swanlab, args.swanlab_project, out, f"eval-{run.name if run else out.name}")
    if run is not None and (page := eval_io.update_compare_report(run, summary)) is not None:
        logger.info("[eval] added the section to %s", page)
    logger.info("[eval] wrote %s", ", ".join(str(p) for p in files.values()))
    return summary, out


def headline(summary: dict) -> list[str]:
    """One line per benchmark and scorer: the models' accuracy and the paired difference."""
    acc = {(r["model"], r["scorer"], r["metric"], r["benchmark"]): r for r in summary["accuracy"]
           if r["subject"] == ALL}
    paired = {(r["scorer"], r["metric"], r["benchmark"]): r for r in summary["paired"]}
    lines = []
    for (model, scorer, metric, bench), row in acc.items():
        if model != "tuned":
            continue
        base = acc.get(("base", scorer, metric, bench))
        diff = paired.get((scorer, metric, bench))
        shown = f"{base['acc']:.1%} → {row['acc']:.1%}" if base else f"{row['acc']:.1%}"
        delta = (f", paired {diff['mean_diff']:+.1%} [{diff['ci_low']:+.1%}, {diff['ci_high']:+.1%}]"
                 if diff and diff["mean_diff"] is not None else "")
        lines.append(f"{bench} {scorer} {metric}: {shown} (n={row['n']}, chance {row['chance']:.1%}){delta}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """``medsft eval``: benchmarks and thinking modes, base vs fine-tuned; writes ``report.html`` and friends."""
    from medsft_lightning.generation.endpoint import EndpointError
    from medsft_lightning.generation.vllm_engine import VllmEngineError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary, out = evaluate(args)
    except (EvalError, ModelError, DataError, FileNotFoundError, EndpointError, VllmEngineError, RuntimeError,
            ValueError, yaml.YAMLError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        sys.exit(f"medsft eval: error: {' '.join(lines) or type(err).__name__}")
    for line in headline(summary):
        print(f"medsft eval: {line}")
    print(f"medsft eval: {summary['questions']} questions → {out / 'report.html'}")
