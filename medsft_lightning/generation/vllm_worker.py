"""The vLLM side of ``medsft predict --engine vllm``: a standalone script run by path with vLLM's own Python.

vLLM pins its own torch and transformers, so it lives in its own environment and cannot be imported by medsft;
this file imports only vLLM and the standard library (never medsft), and :mod:`medsft_lightning.generation.
vllm_engine` runs it as ``VLLM_PYTHON vllm_worker.py CONFIG_JSON``. It talks JSON lines:

- ``CONFIG_JSON`` (argv): ``model`` (a Hugging Face folder), ``dtype``, ``max_model_len``, ``seed``,
  ``gpu_memory_utilization`` (``null``: 0.15 on CPU, where it is the share of the RAM reserved for vLLM, else
  vLLM's default) and ``parent`` (medsft's process id).
- first line on stdout: ``{"ready": true, "vllm": VERSION}`` once the engine is loaded, or ``{"error": TEXT,
  "missing_vllm": BOOL}`` before exiting with status 3.
- each request on stdin: ``{"prompts": [[token ids], …], "sampling": {…}}`` (the keyword arguments of
  ``SamplingParams``); its reply on stdout: ``{"outputs": [{"token_ids": […], "finish_reason": …}, …]}`` in
  the prompts' order, or ``{"error": TEXT}`` (the worker goes on).
- end of stdin (medsft is done): the worker exits. SIGTERM, which Linux also sends when medsft's process ends
  (``PR_SET_PDEATHSIG``: a killed ``medsft predict``), exits too, mid-batch; both go through vLLM's own shutdown,
  which ends its engine processes and removes their shared memory (a SIGKILL would leave them running).

Only the protocol uses the real stdout: everything else printed to it (vLLM's logs, its engine's processes) goes
to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _protocol_stream():
    """A private copy of stdout for the protocol; file descriptor 1 becomes stderr for everyone else."""
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)  # not inherited by child processes
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _end_with_parent(parent: int | None) -> None:
    """SIGTERM (Linux: also when medsft's process ``parent`` ends, even mid-generate) exits through vLLM's own
    shutdown, which ends its engine processes and removes their shared memory."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:  # medsft ended before the line above
        sys.exit(1)


def _send(proto, message: dict) -> None:
    proto.write(json.dumps(message) + "\n")
    proto.flush()


def main(argv: list[str]) -> int:
    proto = _protocol_stream()
    config = json.loads(argv[1])
    _end_with_parent(config.get("parent"))
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform
    except Exception as err:  # ImportError, or a broken install (e.g. a torch it was not built for)
        _send(proto, {"error": f"{sys.executable} cannot import vllm ({type(err).__name__}: {err})",
                      "missing_vllm": True})
        return 3
    memory = config.get("gpu_memory_utilization")
    if memory is None and current_platform.is_cpu():
        memory = 0.15  # the default 0.92 of the RAM fails on CPU
    try:
        llm = LLM(model=config["model"], dtype=config.get("dtype", "auto"), enforce_eager=True,
                  max_model_len=config.get("max_model_len"), seed=config.get("seed", 0),
                  **({"gpu_memory_utilization": memory} if memory is not None else {}))
    except Exception as err:  # reported to medsft, which stops with it
        _send(proto, {"error": f"vLLM could not load {config['model']}: {type(err).__name__}: {err}",
                      "missing_vllm": False})
        return 3
    _send(proto, {"ready": True, "vllm": vllm.__version__})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            params = SamplingParams(**request["sampling"], detokenize=False)
            results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                                   use_tqdm=False)
            outputs = [{"token_ids": list(r.outputs[0].token_ids), "finish_reason": r.outputs[0].finish_reason}
                       for r in results]
        except Exception as err:  # one bad request (e.g. a setting vLLM refuses) does not end the worker
            _send(proto, {"error": f"{type(err).__name__}: {err}"})
            continue
        _send(proto, {"outputs": outputs})
    return 0


if __name__ == "__main__":  # vLLM's engine processes re-import their parent's main module: load nothing then
    sys.exit(main(sys.argv))
