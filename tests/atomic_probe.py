"""Test-only callback for subprocess runs: SIGKILL the whole job halfway through swapping in a sharded save."""

from __future__ import annotations

import os
import re
import signal

import lightning as L


class KillInSwap(L.Callback):
    """When the sharded ``last.ckpt`` of step ``at_step`` or later is swapped in, SIGKILL every process of the
    job (its process group, as a preemption would) after the previous folder was renamed aside and before the
    new one is renamed into place: ``last.ckpt`` is missing then, ``last.ckpt.old-<step>`` holds the previous."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            match = re.fullmatch(r"last\.ckpt\.tmp-(\d+)", os.path.basename(src))
            if match and int(match.group(1)) >= self.at_step and os.path.isdir(src):
                os.killpg(0, signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
