"""``medsft eval``'s work for one model: load it, score every benchmark, run the thinking-mode checks, free it.

:func:`evaluate_model` returns the per-question records (``answers.jsonl``) and the thinking-mode replies
(``thinking.jsonl``); :func:`summarize` turns both models' records into ``summary.json``'s figures.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path

import torch

from medsft_lightning.data.mcq_files import McqSet
from medsft_lightning.generation.generate import Generation
from medsft_lightning.generation.mcq_generate import (
    LocalReplier,
    ServedReplier,
    hf_engine,
    score_replies,
    vllm_token_engine,
)
from medsft_lightning.generation.mcq_loglik import score_loglik
from medsft_lightning.generation.think_checks import check_reply, rates
from medsft_lightning.tools.eval_stats import accuracy_rows, chance, paired_rows, unparseable

logger = logging.getLogger(__name__)
SERVED_FLAGS = ("--endpoint", "--base_endpoint")
QUESTION_KEYS = ("benchmark", "subject", "id", "question", "options", "answer")


@dataclass
class Side:
    """One model to evaluate: ``key`` (``base``/``tuned``), the name as given and the flag it came from."""

    key: str
    name: str
    flag: str
    revision: str | None = None
    served_model: str | None = None


@dataclass
class Settings:
    """What every model is evaluated with (the command line, resolved)."""

    scorers: tuple[str, ...]
    system_prompt: str | None
    max_think_tokens: int
    max_answer_tokens: int
    think_checks: int
    batch_size: int
    generation: Generation
    engine: str = "hf"
    device: str = "cpu"
    cache_dir: str | None = None
    vllm_python: str | None = None
    vllm_batch: int = 64
    api_key: str | None = None


def _bar(desc: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None)


def _record(side: str, scorer: str, question: dict, scored: dict) -> dict:
    return {"model": side, "scorer": scorer, **{k: question[k] for k in QUESTION_KEYS},
            "chance": chance(question, scorer), **scored}


def _replier(side: Side, settings: Settings, loaded, closing: list):
    """The thinking-budgeted replier of ``side`` on the chosen engine."""
    if side.flag in SERVED_FLAGS:
        from medsft_lightning.generation.endpoint import connect

        model_flag = "--served_model" if side.flag == "--endpoint" else "--base_served_model"
        endpoint = connect(side.name, settings.api_key, side.served_model, flag=side.flag, model_flag=model_flag)
        return ServedReplier(endpoint, settings.generation, settings.max_think_tokens, settings.max_answer_tokens,
                             settings.batch_size)
    if settings.engine == "vllm":
        from transformers import AutoTokenizer

        from medsft_lightning import hub
        from medsft_lightning.generation.vllm_engine import VllmEngine
        from medsft_lightning.tools.vllm_env import vllm_python

        path = hub.resolve_model(side.name, revision=side.revision, cache_dir=settings.cache_dir)
        if not Path(path).is_dir():
            raise ValueError(f"{side.flag}={side.name!r}: --engine vllm loads a Hugging Face model folder; export the "
                             "checkpoint first (medsft export CKPT OUT_DIR)")
        engine = VllmEngine(vllm_python(settings.vllm_python), path, "float32" if settings.device == "cpu"
                            else "bfloat16", settings.generation.seed)
        closing.append(engine)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokens = vllm_token_engine(engine, tokenizer, settings.generation.resolved(engine.generation_config),
                                   settings.vllm_batch)
        return LocalReplier(tokenizer, tokens, settings.max_think_tokens, settings.max_answer_tokens)
    tokens = hf_engine(loaded.model, loaded.tokenizer, settings.generation, settings.batch_size, f"{side.key} generate")
    return LocalReplier(loaded.tokenizer, tokens, settings.max_think_tokens, settings.max_answer_tokens)


def evaluate_model(side: Side, benchmarks: Sequence[McqSet], settings: Settings) -> tuple[list, list, dict]:
    """Score one model on every benchmark; returns ``(answers records, thinking records, model info)``."""
    from medsft_lightning.tools.models import load_model

    served = side.flag in SERVED_FLAGS
    loglik = "loglik" in settings.scorers and not served
    generate = "generate" in settings.scorers
    loaded = None
    if not served and (loglik or (generate and settings.engine == "hf")):
        loaded = load_model(side.name, flag=side.flag, device=settings.device, cache_dir=settings.cache_dir,
                            revision=side.revision)
    info = {"name": side.name, "flag": side.flag, "source": loaded.source if loaded else side.name}
    if served and "loglik" in settings.scorers:
        info["note"] = "loglik: n/a for a served model (a chat endpoint returns no option log-likelihoods)"
    answers, thinking, closing = [], [], []
    try:
        if loglik:
            answers += _loglik(side, benchmarks, settings, loaded, info)
        if generate:
            if settings.engine == "vllm" and loaded is not None:  # vLLM takes its share of the device: free ours
                loaded = None
                _release_memory()
            replier = _replier(side, settings, loaded, closing)
            replies = []
            for bench in benchmarks:
                logger.info("[eval] %s: generating %d answers (%s)", side.key, len(bench.questions), bench.name)
                mine = replier.reply(bench.questions, "think", settings.system_prompt)
                replies += mine
                answers += [_record(side.key, "generate", q, s)
                            for q, s in zip(bench.questions, score_replies(bench.questions, mine))]
            thinking = _thinking(side, benchmarks, settings, replier, replies)
    finally:
        for engine in closing:
            engine.close()
        loaded = None
        _release_memory()
    return answers, thinking, info


def _release_memory() -> None:
    """Collect what a model just let go held, and give the device's cached memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _loglik(side: Side, benchmarks: Sequence[McqSet], settings: Settings, loaded, info: dict) -> list[dict]:
    out, skipped = [], {}
    for bench in benchmarks:
        total = sum(len(q["options"]) for q in bench.questions if len(q["answer"]) == 1)
        with _bar(f"{side.key} loglik {bench.name}", total) as bar:
            scored = score_loglik(loaded.model, loaded.tokenizer, bench.questions, settings.system_prompt,
                                  settings.batch_size, bar.update)
        out += [_record(side.key, "loglik", q, s) for q, s in zip(bench.questions, scored) if s is not None]
        skipped[bench.name] = sum(s is None for s in scored)
    info["loglik_skipped_multi_answer"] = skipped
    return out


def _thinking(side: Side, benchmarks: Sequence[McqSet], settings: Settings, replier, replies: list) -> list[dict]:
    """The thinking-mode replies of ``think_checks`` questions, taken in turn from each benchmark: thinking on (the
    generate scorer's own replies), ``enable_thinking=False`` and ``/no_think``."""
    indexed, start = [], 0
    for bench in benchmarks:
        indexed.append([(start + i, q) for i, q in enumerate(bench.questions)])
        start += len(bench.questions)
    chosen = [pair for group in zip_longest(*indexed) for pair in group if pair is not None][: settings.think_checks]
    if not chosen:
        return []
    questions = [q for _, q in chosen]
    logger.info("[eval] %s: thinking-mode checks on %d questions", side.key, len(questions))
    by_mode = {"think": [replies[i] for i, _ in chosen],
               "no_think_flag": replier.reply(questions, "no_think_flag", settings.system_prompt),
               "no_think_switch": replier.reply(questions, "no_think_switch", settings.system_prompt)}
    return [{"model": side.key, "mode": mode, "benchmark": q["benchmark"], "id": q["id"], "raw": r["raw"],
             "finish_reason": r["finish_reason"], "forced_think_end": r.get("forced_think_end", False),
             "checks": check_reply(mode, r)} for mode, got in by_mode.items() for q, r in zip(questions, got)]


def summarize(models: dict, benchmarks: Sequence[McqSet], settings: Settings, answers: list, thinking: list) -> dict:
    """``summary.json``: the models, the benchmarks read, the settings and every figure."""
    by_model: dict = {}
    for row in thinking:
        by_model.setdefault(row["model"], {}).setdefault(row["mode"], []).append(row)
    return {
        "models": models,
        "benchmarks": [{"name": b.name, "layout": b.layout, "questions": len(b.questions), "notes": b.notes}
                       for b in benchmarks],
        "questions": sum(len(b.questions) for b in benchmarks),
        "settings": {"scorers": list(settings.scorers), "system_prompt": settings.system_prompt,
                     "max_think_tokens": settings.max_think_tokens, "max_answer_tokens": settings.max_answer_tokens,
                     "think_checks": settings.think_checks, "engine": settings.engine,
                     "decoding": {k: v for k, v in asdict(settings.generation).items() if k != "max_new_tokens"}},
        "accuracy": accuracy_rows(answers),
        "paired": paired_rows(answers, seed=settings.generation.seed),
        "unparseable": unparseable(answers),
        "thinking": {model: {mode: rates(mode, [{"raw": r["raw"], "finish_reason": r["finish_reason"],
                                                 "forced_think_end": r["forced_think_end"]} for r in rows])
                             for mode, rows in modes.items()} for model, modes in by_model.items()},
    }
