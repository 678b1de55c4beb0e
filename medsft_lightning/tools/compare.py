"""``medsft compare``: the base model and the fine-tuned one on the same questions, with an offline report.

::

    medsft compare --run runs/demo/version_0 [--limit 10] [--max_new_tokens 512]
    medsft compare --base Qwen/Qwen3-1.7B --model runs/x/version_0/hf_model --questions q.jsonl --out compare

With ``--run`` the base model is the run's ``model.model_name_or_path``, the fine-tuned one ``RUN/hf_model``, the
questions the run's validation split (rebuilt from its ``config.yaml``: the same 90/10 seeded split) and the
training curves its ``metrics.csv``. Each model in turn is loaded, scored teacher-forced on the references
(:mod:`~medsft_lightning.tools.compare_metrics`), made to answer every question with the same prompts, decoding
and seed (the batched path ``medsft predict`` and ``gen_metrics`` use), and freed before the next one. ``--out``
receives ``pairs.jsonl``, ``metrics.json``, ``report.md`` and a self-contained ``report.html``
(:mod:`~medsft_lightning.tools.report`). ``--endpoint URL`` / ``--base_endpoint URL``: a side served by a running
OpenAI-compatible server instead (:mod:`~medsft_lightning.tools.compare_served`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from medsft_lightning.data.encoding import TemplateError, build_prompts
from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT
from medsft_lightning.data.sources import DataError, read_records
from medsft_lightning.generation.generate import Generation, generate_batch, generation_mode
from medsft_lightning.generation.wrapped import base_model
from medsft_lightning.tools import compare_served as served
from medsft_lightning.tools.compare_metrics import generation_summary, paired, score_answer, teacher_forced
from medsft_lightning.tools.eval_io import run_eval_section
from medsft_lightning.tools.models import ModelError, load_model, looks_like_path
from medsft_lightning.tools.preview import LINKED
from medsft_lightning.tools.report import write_reports

logger = logging.getLogger(__name__)
OPTIONAL_TEXT = ("system", "think", "answer")


class CompareError(ValueError):
    """What to compare cannot be worked out: a run folder without its config or exported model, missing flags."""


@dataclass
class Inputs:
    """What to compare: the two models (with the flag each came from), the questions and their settings."""

    base: str
    base_flag: str
    tuned: str
    tuned_flag: str
    rows: list[dict]
    system_prompt: str | None
    max_length: int
    cache_dir: str | None
    base_revision: str | None
    out: Path
    metrics_csv: Path | None
    run: Path | None


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="medsft compare", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--run", help="a medsft fit run folder (runs/demo/version_0): its config.yaml, hf_model and metrics.csv")
    add("--base", help="the base model (default with --run: the run's model.model_name_or_path)")
    add("--model", help="the fine-tuned model (default with --run: RUN/hf_model)")
    add("--questions", help="a .jsonl/.json file of rows with question (optional id, system, think, answer); "
                            "default with --run: the run's validation split")
    add("--out", help="output folder (default: RUN/compare, else ./compare)")
    add("--limit", type=int, help="answer only the first N questions (default: all; teacher-forced metrics always "
                                  "use every row with a reference)")
    add("--batch_size", type=int, default=8, help="prompts generated together, and rows per teacher-forced pass")
    add("--max_new_tokens", type=int, default=512, help="most tokens per answer, think block included")
    add("--temperature", type=float, help="default: the base model's generation config, else Qwen3's 0.6")
    add("--top_p", type=float, help="default: the base model's generation config, else Qwen3's 0.95")
    add("--top_k", type=int, help="default: the base model's generation config, else Qwen3's 20")
    add("--seed", type=int, default=0, help="sampling seed (the same for both models) and the bootstrap's")
    add("--greedy", action="store_true", help="decode greedily instead of sampling")
    add("--system_prompt", help="system turn (default: the run's data.system_prompt, else medsft's default)")
    add("--max_length", type=int, help="teacher-forced rows cut to this many tokens (default: the run's, else 2048)")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    served.add_endpoint_args(parser)
    return parser


def _question_problem(obj: object, seen: set) -> str | None:
    """What is wrong with one record of a questions file, or ``None``."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if not isinstance(obj.get("question"), str) or not obj["question"].strip():
        return "question: missing, empty or not a string"
    wrong = [name for name in OPTIONAL_TEXT if name in obj and not isinstance(obj[name], str | None)]
    if wrong:
        return f"{wrong[0]}: expected a string, got {type(obj[wrong[0]]).__name__}"
    if "id" in obj and not isinstance(obj["id"], str | int):
        return f"id: expected a string or an integer, got {type(obj['id']).__name__}"
    if obj.get("id") in seen:
        return f"id: {obj['id']!r} appears twice"
    return None


def read_compare_questions(path: str) -> list[dict]:
    """Rows of a ``--questions`` file; the first bad record is one :class:`DataError` naming ``file:line``.

    Args:
        path: a .jsonl file (one JSON object a line) or a .json array of objects.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--questions={path!r}: no such file")
    rows, problems, seen = [], [], set()
    for position, (line, obj) in enumerate(read_records(file)):
        problem = _question_problem(obj, seen)
        if problem:
            problems.append(f"{file}:{line}: {problem}" if line else f"{file}[{position}]: {problem}")
            continue
        row_id = obj.get("id", position)
        seen.add(row_id)
        rows.append({"id": row_id, "question": obj["question"],
                     **{k: obj[k] for k in OPTIONAL_TEXT if isinstance(obj.get(k), str)}})
    if problems:
        more = f" (and {len(problems) - 1} more bad record(s))" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    if not rows:
        raise DataError(f"{file}: holds no question")
    return rows


def validation_rows(model: dict, data: dict) -> list[dict]:
    """A run's validation split, rebuilt with :class:`MedicalDataModule` from its ``model``/``data`` settings."""
    from medsft_lightning.data.datamodule import MedicalDataModule

    accepted = set(inspect.signature(MedicalDataModule.__init__).parameters) - {"self"}
    settings = {k: v for k, v in data.items() if k in accepted}
    settings.update({target: model[source] for target, source in LINKED.items() if model.get(source) is not None})
    _, val = MedicalDataModule(**settings).split_rows()
    return [{"id": i, "question": r["question"], "think": r["think"], "answer": r["answer"]}
            for i, r in enumerate(val.rows)]


def resolve_inputs(args: argparse.Namespace) -> Inputs:
    """The models, questions and settings ``args`` name, from the run folder or the explicit flags."""
    model: dict = {}
    data: dict = {}
    run = Path(args.run) if args.run else None
    if run is not None:
        if not run.is_dir():
            raise FileNotFoundError(f"--run={args.run!r}: no such folder")
        config = run / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"--run={args.run!r}: no config.yaml in it (give a medsft fit run folder, "
                                    "e.g. runs/demo/version_0)")
        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        model, data = cfg.get("model") or {}, cfg.get("data") or {}
        data = data.get("init_args", data)
        if args.model is None and args.endpoint is None and not (run / "hf_model").is_dir():
            raise CompareError(f"--run={args.run!r}: no hf_model folder in it (the run was not exported; write one "
                               f"with: medsft export {run}/checkpoints/best.ckpt {run}/hf_model)")
    base = args.base_endpoint or args.base or model.get("model_name_or_path")
    tuned = args.endpoint or args.model or (str(run / "hf_model") if run else None)
    if not base or not tuned or (run is None and not args.questions):
        raise CompareError("give --run RUN_DIR, or --base MODEL --model MODEL --questions FILE (--base_endpoint URL / "
                           "--endpoint URL for served models)")
    rows = read_compare_questions(args.questions) if args.questions else validation_rows(model, data)
    return Inputs(
        base=base, base_flag="--base_endpoint" if args.base_endpoint else "--base" if args.base
        else f"model.model_name_or_path (in {run}/config.yaml)",
        tuned=tuned, tuned_flag="--endpoint" if args.endpoint else "--model" if args.model else "--run",
        rows=rows,
        system_prompt=args.system_prompt if args.system_prompt is not None
        else data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
        max_length=args.max_length or data.get("max_length") or 2048,
        cache_dir=model.get("cache_dir"),
        base_revision=None if args.base else model.get("model_revision"),
        out=Path(args.out) if args.out else (run / "compare" if run else Path("compare")),
        metrics_csv=run / "metrics.csv" if run is not None and (run / "metrics.csv").is_file() else None,
        run=run,
    )


def _generate(model, tokenizer, prompts: list[list[int]], settings: Generation, batch_size: int) -> tuple[list, float]:
    """Every answer, batch by batch in question order, under one seeded ``generation_mode``; and the seconds."""
    outputs, start = [], time.perf_counter()
    with torch.inference_mode(), generation_mode(model, settings.seed):
        for i in range(0, len(prompts), batch_size):
            outputs += generate_batch(model, tokenizer, prompts[i : i + batch_size], settings)
            logger.info("[compare] answered %d of %d", len(outputs), len(prompts))
    return outputs, time.perf_counter() - start


def evaluate(name: str, flag: str, inputs: Inputs, settings: Generation, args: argparse.Namespace) -> tuple:
    """Load one model, score it teacher-forced, let it answer the questions, free it.

    Args:
        name: the model as given; ``flag``: where it was given (for errors).
        inputs: the questions and their settings.
        settings: decoding; ``None`` fields resolve against this model's generation config.
        args: the command line (``limit``, ``batch_size``, ``device``).

    Returns:
        ``(summary, scored answers, resolved settings)``.
    """
    if flag in served.ENDPOINT_FLAGS:  # a running server answers (--endpoint, --base_endpoint)
        return served.evaluate_served(name, flag, inputs, settings, args)
    revision = inputs.base_revision if name == inputs.base else None
    loaded = load_model(name, flag=flag, device=args.device, cache_dir=inputs.cache_dir, revision=revision)
    tokenizer = loaded.tokenizer
    settings = settings.resolved(getattr(base_model(loaded.model), "generation_config", None))
    forced = teacher_forced(loaded.model, tokenizer, inputs.rows, system_prompt=inputs.system_prompt,
                            max_length=inputs.max_length, batch_size=args.batch_size)
    logger.info("[compare] %s: teacher-forced on %d rows (%d tokens): val_loss %s", name, forced["rows"],
                forced["tokens"], forced["val_loss"])
    questions = inputs.rows[: args.limit]
    prompts = build_prompts(questions, tokenizer, inputs.system_prompt)
    logger.info("[compare] %s: answering %d questions, %s", name, len(questions), settings.describe())
    outputs, seconds = _generate(loaded.model, tokenizer, prompts, settings, args.batch_size)
    scored = [score_answer(o, q.get("answer"), tokenizer) for o, q in zip(outputs, questions, strict=True)]
    fingerprint = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:12]
    summary = {"name": name, "source": loaded.source, "prompts": fingerprint,
               "teacher_forced": forced, "generation": generation_summary(scored, seconds)}
    del loaded, outputs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary, scored, settings


def compare(args: argparse.Namespace) -> dict:
    """Run the comparison ``args`` describe and write its files; returns ``metrics.json``'s content."""
    for value, flag in ((args.limit, "--limit"), (args.batch_size, "--batch_size"),
                        (args.max_new_tokens, "--max_new_tokens")):
        if value is not None and value < 1:
            raise CompareError(f"{flag}={value}: use 1 or more")
    served.check_endpoint_args(args)
    inputs = resolve_inputs(args)
    for name, flag in ((inputs.base, inputs.base_flag), (inputs.tuned, inputs.tuned_flag)):
        if flag not in served.ENDPOINT_FLAGS and looks_like_path(name) and not Path(name).expanduser().exists():
            raise ModelError(f"{flag}={name!r}: no such file or folder")
    settings = Generation(max_new_tokens=args.max_new_tokens, do_sample=False if args.greedy else None,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    base, base_scored, settings = evaluate(inputs.base, inputs.base_flag, inputs, settings, args)
    tuned, tuned_scored, _ = evaluate(inputs.tuned, inputs.tuned_flag, inputs, settings, args)
    if base["prompts"] != tuned["prompts"] and ("endpoint" in base) == ("endpoint" in tuned):
        logger.warning("[compare] the two tokenizers encode the prompts differently: each model got its own")
    questions = inputs.rows[: args.limit]
    pairs = [{"id": q["id"], "question": q["question"],
              **{f"reference_{k}": q[k] for k in ("think", "answer") if k in q}, "base": b, "tuned": t}
             for q, b, t in zip(questions, base_scored, tuned_scored, strict=True)]
    metrics = {
        "run": str(inputs.run) if inputs.run else None, "questions": len(pairs),
        "models": {"base": base, "tuned": tuned},
        "paired": paired([p["base"]["rougeL"] for p in pairs], [p["tuned"]["rougeL"] for p in pairs], seed=args.seed),
        "decoding": asdict(settings),
        "system_prompt": inputs.system_prompt, "max_length": inputs.max_length,
    }
    inputs.out.mkdir(parents=True, exist_ok=True)
    with (inputs.out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    (inputs.out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    write_reports(inputs.out, metrics, pairs, inputs.metrics_csv, run_eval_section(inputs.run))  # medsft eval's
    return metrics


def _one_line(err: BaseException) -> str:
    """An error's message on one line (a data error's list of problems joined with ``;``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] + (" " + "; ".join(lines[1:]) if lines[1:] else "")) if lines else type(err).__name__


def main(argv: list[str] | None = None) -> None:
    """``medsft compare``: base vs fine-tuned on the same questions; writes ``report.html`` and friends."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        metrics = compare(args)
    except (ModelError, DataError, TemplateError, CompareError, served.EndpointError, FileNotFoundError,
            yaml.YAMLError) as err:
        sys.exit(f"medsft compare: error: {_one_line(err)}")
    out = Path(args.out) if args.out else (Path(args.run) / "compare" if args.run else Path("compare"))
    base, tuned = (metrics["models"][k]["generation"]["rougeL"] for k in ("base", "tuned"))
    p = metrics["paired"]
    rouge = f"ROUGE-L {base:.4f} → {tuned:.4f}, " if base is not None and tuned is not None else ""
    print(f"medsft compare: {metrics['questions']} questions, {rouge}fine-tuned wins {p['wins']}, loses "
          f"{p['losses']}, ties {p['ties']} → {out / 'report.html'}")
