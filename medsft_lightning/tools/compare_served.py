"""``medsft compare`` with a served model on one side or both: ``--endpoint URL`` and ``--base_endpoint URL``.

``--endpoint`` stands in for the fine-tuned model (``--model``, ``RUN/hf_model``), ``--base_endpoint`` for the
base (``--base``, the run's ``model.model_name_or_path``); each is a running OpenAI-compatible server
(``medsft serve``, vLLM; :mod:`~medsft_lightning.generation.endpoint`). A served model answers the same
questions, sent as messages (the system prompt and the question; the server applies the chat template), with the
same decoding settings and seed, ``--batch_size`` requests at a time. Its think/answer token counts come from the
server's ``usage``. Teacher-forced metrics need the model's logits on the reference answers, which a chat
endpoint does not return: for a served model they are ``null`` in ``metrics.json`` and ``n/a (served model)`` in
the reports (a local model on the other side is still scored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time

from medsft_lightning.data.formatting import prompt_messages
from medsft_lightning.generation.endpoint import EndpointError, connect, generate_answers
from medsft_lightning.generation.generate import Generation
from medsft_lightning.generation.metrics import rouge_l_f1
from medsft_lightning.tools.compare_metrics import TEACHER_FORCED, bleu4, generation_summary

logger = logging.getLogger(__name__)
ENDPOINT_FLAGS = ("--endpoint", "--base_endpoint")
SERVED_NOTE = "n/a (served model)"


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--endpoint``, ``--served_model``, ``--base_endpoint``, ``--base_served_model``, ``--api_key``."""
    add = parser.add_argument
    add("--endpoint", metavar="URL", help="the fine-tuned model served by an OpenAI-compatible server (medsft serve, "
                                          "vLLM), e.g. http://127.0.0.1:8000/v1; replaces --model / RUN/hf_model. "
                                          "Teacher-forced metrics are n/a for a served model")
    add("--served_model", metavar="NAME", help="the model to ask at --endpoint (default: the first of /v1/models)")
    add("--base_endpoint", metavar="URL", help="the base model served by an OpenAI-compatible server; replaces --base")
    add("--base_served_model", metavar="NAME", help="the model to ask at --base_endpoint (default: the first listed)")
    add("--api_key", help="API key for the endpoints (default: $OPENAI_API_KEY, else EMPTY); never saved")


def check_endpoint_args(args: argparse.Namespace) -> None:
    """Flags that do not go together raise one :class:`EndpointError`."""
    for url, local, name, served in (("--endpoint", "--model", "served_model", "--served_model"),
                                     ("--base_endpoint", "--base", "base_served_model", "--base_served_model")):
        if getattr(args, url[2:]) and getattr(args, local[2:]):
            raise EndpointError(f"{url} replaces {local}: give one of them")
        if getattr(args, name) and not getattr(args, url[2:]):
            raise EndpointError(f"{served} names a model at {url}: give {url} URL too")


def score_served(output: dict, reference: str | None) -> dict:
    """A served answer as ``pairs.jsonl`` keeps it (as :func:`~medsft_lightning.tools.compare_metrics.score_answer`
    does, with the server's token counts)."""
    keys = ("think", "answer", "finish_reason", "num_generated_tokens", "well_formed", "think_tokens", "answer_tokens")
    scored = {key: output[key] for key in keys}
    scored.update(rougeL=None, bleu4=None)
    if reference:
        scored.update(rougeL=rouge_l_f1([output["answer"]], [reference]), bleu4=bleu4(output["answer"], reference))
    return scored


def evaluate_served(url: str, flag: str, inputs, settings: Generation, args: argparse.Namespace) -> tuple:
    """:func:`~medsft_lightning.tools.compare.evaluate` for a served model: ``(summary, scored, settings)``.

    Args:
        url: the server; ``flag``: ``--endpoint`` or ``--base_endpoint``.
        inputs: the questions and their settings (:class:`~medsft_lightning.tools.compare.Inputs`).
        settings: decoding (unset fields: Qwen3's values; the server's generation config cannot be read).
        args: the command line (``limit``, ``batch_size``, ``api_key``, the served names).
    """
    model_flag = "--served_model" if flag == "--endpoint" else "--base_served_model"
    endpoint = connect(url, args.api_key, getattr(args, model_flag[2:]), flag=flag, model_flag=model_flag)
    settings = settings.resolved(None)
    questions = inputs.rows[: args.limit]
    conversations = [prompt_messages(q, q.get("system", inputs.system_prompt)) for q in questions]
    logger.info("[compare] %s at %s: answering %d questions, %s", endpoint.model, url, len(questions),
                settings.describe())
    start = time.perf_counter()
    outputs = generate_answers(endpoint, conversations, settings, workers=args.batch_size,
                               progress=lambda done, total: logger.info("[compare] answered %d of %d", done, total))
    seconds = time.perf_counter() - start
    scored = [score_served(o, q.get("answer")) for o, q in zip(outputs, questions, strict=True)]
    summary = {"name": endpoint.model, "source": url, "endpoint": url,
               "prompts": hashlib.sha256(json.dumps(conversations).encode()).hexdigest()[:12],
               "teacher_forced": {**dict.fromkeys(TEACHER_FORCED), "rows": 0, "tokens": 0, "note": SERVED_NOTE},
               "generation": generation_summary(scored, seconds)}
    return summary, scored, settings
