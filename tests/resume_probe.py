"""Test-only callback for subprocess runs: logs each training batch's rows, and SIGKILLs on request."""

from __future__ import annotations

import io
import json
import os
import signal

import lightning as L
import torch


class Probe(L.Callback):
    """Append ``{epoch, step, batch_idx, rows}`` per training batch to ``log``; kill the process with
    SIGKILL after step ``kill_at_step``, or halfway through writing the first checkpoint saved at or
    after step ``kill_in_save_at_step``."""

    def __init__(self, log: str, kill_at_step: int = 0, kill_in_save_at_step: int = 0) -> None:
        self.log_path, self.kill_at_step, self.kill_in_save_at_step = log, kill_at_step, kill_in_save_at_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.kill_in_save_at_step:
            return
        real_save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            if trainer.global_step < self.kill_in_save_at_step or not hasattr(f, "write"):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = torn_save

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step, "batch_idx": batch_idx,
                "rows": batch["row_id"].tolist()}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.kill_at_step and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
