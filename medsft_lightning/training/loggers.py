"""SwanLab logging that never prompts and never records the API key."""

from __future__ import annotations

import os
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from swanlab.integration.pytorch_lightning import SwanLabLogger

from medsft_lightning.hub.secrets import is_secret_name


def swanlab_key_available() -> bool:
    """True when SwanLab can find an API key (``SWANLAB_API_KEY`` or a saved ``swanlab login``)."""
    try:
        import swanlab

        return bool(swanlab.Settings().api_key)
    except Exception:  # an unreadable settings file must not stop training
        return bool(os.environ.get("SWANLAB_API_KEY"))


def resolve_mode(mode: str) -> str:
    """``auto`` → ``SWANLAB_MODE`` if set, else ``online`` with a key, else ``offline``."""
    if mode != "auto":
        return mode
    if os.environ.get("SWANLAB_MODE"):
        return os.environ["SWANLAB_MODE"]
    return "online" if swanlab_key_available() else "offline"


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Drop the keys that name a credential (``api_key``, ``hf_token``, ``password``, …: ``hub.secrets``), at any
    depth; every other setting, ``max_new_tokens`` and ``tokenizer`` included, reaches SwanLab."""
    clean: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_name(str(key)):
            continue
        clean[key] = scrub(value) if isinstance(value, dict) else value
    return clean


class MedSwanLabLogger(SwanLabLogger):
    """SwanLab's Lightning logger with a mode that never blocks a run on a login prompt.

    The API key is read by SwanLab itself from ``SWANLAB_API_KEY`` or ``swanlab login``; it is not an
    argument here, so it cannot land in a saved config.

    Args:
        project: SwanLab project.
        workspace: SwanLab workspace (user or organisation); ``None`` for the key's default.
        experiment_name: run name shown in SwanLab.
        description: free-text run description.
        mode: ``auto`` (``online`` when a key is available, else ``offline`` with files for a later
            ``swanlab sync``), or ``online``, ``offline``, ``local``, ``disabled``.
        log_dir: folder for SwanLab's own files; ``None`` puts them in the run folder's ``swanlog/``.
        tags: run tags.
    """

    def __init__(
        self,
        project: str = "medsft",
        workspace: str | None = None,
        experiment_name: str | None = None,
        description: str | None = None,
        mode: Literal["auto", "online", "offline", "local", "disabled"] = "auto",
        log_dir: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        self.requested_mode = mode
        resolved = resolve_mode(mode)
        super().__init__(project=project, workspace=workspace, experiment_name=experiment_name,
                         description=description, log_dir=log_dir, mode=resolved, tags=tags)
        if mode == "auto":
            rank_zero_info(f"[swanlab] mode auto → {resolved}"
                           + ("" if resolved != "offline" else " (no API key found; `swanlab sync` uploads later)"))

    def set_log_dir(self, log_dir: str) -> None:
        """Point SwanLab's files at ``log_dir`` unless the user chose a folder (before the run starts)."""
        if self._experiment is None and "log_dir" not in self._init_kwargs:
            self._init_kwargs["log_dir"] = log_dir

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        super().log_hyperparams(scrub(self._params_to_dict(params)), *args, **kwargs)
