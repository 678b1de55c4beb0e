"""``medsft predict --engine vllm``: the questions decoded by vLLM's offline engine, in vLLM's own Python.

vLLM pins its own torch and transformers and lives in its own environment, so medsft runs
:mod:`~medsft_lightning.generation.vllm_worker` (a standalone script) with that Python and talks JSON lines
with it: a batch of prompt token ids and the sampling settings go in, each prompt's generated token ids come
back. Everything else stays medsft's: the DataModule builds the prompts (length-sorted, only the rows not
answered yet), :func:`~medsft_lightning.generation.generate.generated_output` turns the tokens into the same
``think``/``answer``/``raw``/``finish_reason``/``num_generated_tokens`` as the default engine, and the
AnswerWriter appends each batch (``--vllm_batch`` questions, one ``generate`` call, continuously batched inside
vLLM) with fsync, so a kill loses at most one batch and a rerun answers only the rest.

Decoding: the same :class:`~medsft_lightning.generation.generate.Generation` settings, resolved against the
model's generation config; greedy is ``temperature 0``, sampling passes ``temperature``/``top_p``/``top_k`` and
``seed`` (``SamplingParams(seed=…)``: each question draws from its own generator seeded with it),
and ``presence_penalty``/``repetition_penalty`` are vLLM's own (the default engine implements vLLM's
semantics). Only ``<|im_end|>``/``<|endoftext|>`` stop a row (``ignore_eos``), as in the default engine.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

from medsft_lightning import hub
from medsft_lightning.generation.generate import STOP_TOKENS, Generation, generated_output

logger = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("vllm_worker.py")
# Lightning precision -> vLLM dtype, as MedSFTModule loads the model (fp64 has no vLLM kernels: fp32)
VLLM_DTYPES = {"bf16-true": "bfloat16", "16-true": "float16"}


class VllmEngineError(RuntimeError):
    """vLLM could not be used: refused settings, a load failure, or a failed batch (with its log's last lines)."""


def add_vllm_arguments(parser) -> None:
    """``--engine``, ``--vllm_python`` and ``--vllm_batch`` on a LightningCLI parser (read by ``medsft predict``)."""
    parser.add_argument(
        "--engine", type=Literal["hf", "vllm"], default="hf",
        help="predict: hf decodes in this process (transformers); vllm runs vLLM's offline engine in vLLM's own "
             "Python (--vllm_python): same input, answers file, resume and decoding settings",
    )
    parser.add_argument(
        "--vllm_python", type=str | None, default=None,
        help="predict --engine vllm: the Python that has vLLM (default: $MEDSFT_VLLM_PYTHON, else this one)",
    )
    parser.add_argument(
        "--vllm_batch", type=int, default=64,
        help="predict --engine vllm: questions per vLLM generate call and per append to the answers file "
             "(replaces --data.batch_size); larger keeps vLLM's continuous batching full, a kill loses one batch",
    )


def setup_engine(cli, find_python) -> VllmEngine | None:
    """``medsft predict``'s ``--engine``: nothing for ``hf`` (or another subcommand); for ``vllm`` checks, then a
    :class:`VllmEngine` on the module's ``predict_engine`` and among the trainer's callbacks (it starts and ends
    with the predict loop).

    ``cli``: the MedSFTCLI before its subcommand runs (``subcommand``, ``model``, ``datamodule``, ``trainer`` and
    the parsed ``config``: ``engine``, ``vllm_python``, ``vllm_batch``, ``ckpt_path``). ``find_python``:
    :func:`medsft_lightning.tools.vllm_env.vllm_python` (tools is the stage above this one). Raises
    :class:`VllmEngineError` for what cannot work: no Python with vLLM (``VllmMissing``'s message: how to install
    one), ``--ckpt_path`` (vLLM loads a Hugging Face folder), several processes or FSDP2, ``--vllm_batch`` < 1,
    a ``presence_penalty`` outside vLLM's [-2, 2].
    """
    config = cli.config[cli.subcommand] if cli.subcommand == "predict" else {}
    if config.get("engine", "hf") != "vllm":
        return None
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if config.get("ckpt_path"):
        raise VllmEngineError(f"--engine vllm loads a Hugging Face model folder, not --ckpt_path "
                              f"{config['ckpt_path']}: export it first (medsft export CKPT OUT_DIR) and pass "
                              "--model.model_name_or_path OUT_DIR")
    if trainer.world_size > 1 or isinstance(trainer.strategy, ModelParallelStrategy):
        raise VllmEngineError("--engine vllm runs one vLLM engine in this one process, which batches all the "
                              "questions itself; several processes (or FSDP2) would each start one on the same "
                              "device: predict without --trainer.strategy ddp/fsdp2 and --trainer.devices N")
    batch = config.get("vllm_batch") or 0
    if batch < 1:
        raise VllmEngineError(f"--vllm_batch={batch}: use 1 or more questions per batch")
    if not -2 <= module.generation.presence_penalty <= 2:
        raise VllmEngineError(f"--model.generation.presence_penalty={module.generation.presence_penalty}: vLLM "
                              "takes -2 to 2")
    try:
        python = find_python(config.get("vllm_python"))
    except RuntimeError as err:  # VllmMissing
        raise VllmEngineError(str(err)) from None
    hp = module.hparams
    path = hub.resolve_model(hp.model_name_or_path, revision=hp.model_revision, cache_dir=hp.cache_dir)
    engine = VllmEngine(python, path, VLLM_DTYPES.get(str(trainer.precision), "float32"), module.generation.seed)
    # resolved now, so that the AnswerWriter's log (which sees no model in this process) names the real settings
    module.generation = module.generation.resolved(engine.generation_config)
    module.predict_engine = engine
    datamodule.hparams.batch_size = batch
    trainer.callbacks.append(engine)
    logger.info("[predict] engine vllm: %s, batches of %d questions (--vllm_batch)", python, batch)
    return engine


def sampling_params(settings: Generation, stop_ids: Sequence[int]) -> dict:
    """vLLM ``SamplingParams`` keyword arguments for resolved ``settings`` (greedy: temperature 0)."""
    params = {"max_tokens": settings.max_new_tokens, "stop_token_ids": list(stop_ids), "ignore_eos": True,
              "presence_penalty": settings.presence_penalty, "repetition_penalty": settings.repetition_penalty,
              "seed": settings.seed}
    if not settings.do_sample:
        return {**params, "temperature": 0.0}
    top_p = settings.top_p if settings.top_p is not None and 0 < settings.top_p < 1 else 1.0  # as pick_tokens
    return {**params, "temperature": settings.temperature, "top_p": top_p, "top_k": max(0, settings.top_k or 0)}


def model_generation_config(path: str | os.PathLike):
    """The folder's ``generation_config.json`` as transformers reads it, else ``None`` (what the default engine's
    ``from_pretrained`` model would resolve :class:`Generation` against)."""
    from transformers import GenerationConfig

    if not (Path(path) / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(path)


class VllmEngine(L.Callback):
    """The client of one vLLM worker process: started with the predict loop, one request per batch.

    Args:
        python: the Python that has vLLM (``tools.vllm_env.vllm_python``).
        model: the Hugging Face model folder.
        dtype: vLLM's ``dtype`` (``float32``, ``bfloat16``, …).
        seed: the engine's seed (each request also carries its ``seed``).
        gpu_memory_utilization: ``None``: 0.15 on CPU (there: the share of the RAM vLLM reserves), vLLM's default
            on a GPU.
        worker: the worker script (tests give a stand-in).
    """

    def __init__(self, python: str, model: str | os.PathLike, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float | None = None, worker: str | os.PathLike = WORKER) -> None:
        self.python, self.model, self.dtype, self.seed = str(python), str(model), dtype, seed
        self.memory, self.worker = gpu_memory_utilization, str(worker)
        self.generation_config = model_generation_config(model)
        self.proc: subprocess.Popen | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._max_model_len: int | None = None

    # -- the predict loop's hooks ----------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        rows = [row for dl in (loaders if isinstance(loaders, (list, tuple)) else [loaders]) for row in dl.dataset]
        longest = max((len(r["prompt_ids"]) for r in rows), default=1)
        self.start(longest + max(1, pl_module.generation.max_new_tokens))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close(now=True)  # e.g. Ctrl-C: do not let vLLM finish its batch first

    # -- the worker --------------------------------------------------------------------------------
    def start(self, max_model_len: int) -> None:
        """Start the worker (unless running) and wait until vLLM has loaded the model (~30 s on CPU for the tiny
        model, most of it vLLM starting its engine processes)."""
        if self.proc is not None:
            return
        limit = self._max_positions()
        self._max_model_len = min(max_model_len, limit) if limit else max_model_len
        config = {"model": self.model, "dtype": self.dtype, "max_model_len": self._max_model_len, "seed": self.seed,
                  "gpu_memory_utilization": self.memory, "parent": os.getpid()}
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        logger.info("[predict] starting vLLM on %s (%s, max_model_len %d)", self.model, self.dtype,
                    self._max_model_len)
        started = time.perf_counter()
        # its own session: a Ctrl-C in the terminal reaches medsft, which ends the worker (close) in order
        self.proc = subprocess.Popen([self.python, self.worker, json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                     env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read_log, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        ready = self._receive("starting")
        logger.info("[predict] vLLM %s ready after %.0f s", ready.get("vllm", "?"), time.perf_counter() - started)

    def generate(self, tokenizer, prompts: Sequence[Sequence[int]], settings: Generation) -> list[dict]:
        """The answers to a batch of prompt ids, in order, as :func:`~medsft_lightning.generation.generate.
        generate_batch` returns them."""
        stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        return [generated_output(ids, tokenizer, stop_ids) for ids in self.generate_ids(prompts, settings, stop_ids)]

    def generate_ids(self, prompts: Sequence[Sequence[int]], settings: Generation, stop_ids: Sequence[int]
                     ) -> list[list[int]]:
        """The generated token ids of each prompt, in order (``medsft eval`` continues some of them)."""
        settings = settings.resolved(self.generation_config)
        if settings.max_new_tokens < 1 or not prompts:
            return [[] for _ in prompts]
        if self.proc is None:
            self.start(max(len(p) for p in prompts) + settings.max_new_tokens)
        request = {"prompts": [[int(t) for t in p] for p in prompts], "sampling": sampling_params(settings, stop_ids)}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: _receive says why
        outputs = self._receive("generating")["outputs"]
        if len(outputs) != len(prompts):
            raise VllmEngineError(f"vLLM answered {len(outputs)} of {len(prompts)} prompts")
        return [list(o["token_ids"]) for o in outputs]

    def close(self, timeout: float = 30.0, now: bool = False) -> None:
        """End the worker: end of its input (``now``: SIGTERM, which ends a batch under way too), then vLLM's own
        shutdown (~5 s: its engine processes and shared memory go with it); SIGTERM, then SIGKILL to its process
        group, if it takes longer than ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        first = proc.terminate if now else None
        for escalate in (first, proc.terminate, lambda: os.killpg(proc.pid, signal.SIGKILL)):
            try:
                if escalate is not None:
                    escalate()
                proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                logger.warning("[predict] the vLLM worker (pid %d) has not ended after %.0f s", proc.pid, timeout)
            except ProcessLookupError:
                return

    # -- helpers -----------------------------------------------------------------------------------
    def _receive(self, doing: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:  # the worker died (killed, out of memory, a crash)
            status = self.proc.wait()
            self._reader.join(timeout=1)  # its last log lines
            raise VllmEngineError(f"the vLLM worker exited (status {status}) while {doing}{self._tail()}")
        message = json.loads(line)
        if "error" in message:
            raise VllmEngineError(f"vLLM: {message['error']}" + (self._tail() if doing == "starting" else ""))
        return message

    def _tail(self) -> str:
        tail = "\n    ".join(list(self.log_tail)[-12:])
        return f"\n  vLLM's last log lines:\n    {tail}" if tail else ""

    def _read_log(self, stream) -> None:
        for line in stream:
            line = line.rstrip()
            self.log_tail.append(line)
            logger.debug("[vllm] %s", line)

    def _max_positions(self) -> int | None:
        try:
            config = json.loads((Path(self.model) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
