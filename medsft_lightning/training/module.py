"""The LightningModule: Qwen3 full-parameter fine-tuning with a token-mean loss."""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from medsft_lightning import hub
from medsft_lightning.data.packing import packed_model_inputs
from medsft_lightning.generation.generate import Generation, generate_batch
from medsft_lightning.generation.wrapped import base_model
from medsft_lightning.training import optim
from medsft_lightning.training.lora import LoraSettings, apply_lora
from medsft_lightning.training.loss import lm_loss
from medsft_lightning.training.resume import align_val_check, restore_rng, rng_state, sync_optimizer_hparams
from medsft_lightning.training.sharding import shard_causal_lm

PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def as_dataclass(cls: type, value):
    """``value`` as a ``cls`` dataclass: a dict's keys become its fields; ``None`` and instances pass through."""
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**value)
    return value


def own_aligned_memory(model: torch.nn.Module) -> None:
    """Copy CPU parameters out of the memory-mapped checkpoint file into 64-byte-aligned memory.

    ``from_pretrained`` leaves CPU weights as views of the mmapped safetensors file at 8-byte offsets;
    a skinny GEMM on such a weight (decoding's LM head at batch 8) runs ~25% slower than on an aligned
    copy. A tied weight is one Parameter, visited once, so it stays tied.
    """
    for param in model.parameters():
        if param.device.type == "cpu" and param.data_ptr() % 64:
            param.data = param.data.clone()


class MedSFTModule(L.LightningModule):
    """Qwen3 (any causal LM) fine-tuned on all parameters.

    Args:
        model_name_or_path: ModelScope id (``Qwen/Qwen3-1.7B``), ``hf://`` Hugging Face id, local
            folder, or ``medsft:tiny-qwen3`` (the offline tiny model, built on first use).
        model_revision: ModelScope revision of the model.
        cache_dir: download cache (default: ModelScope's, ``MODELSCOPE_CACHE``).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        betas: AdamW betas.
        warmup_ratio: share of all optimizer steps spent warming the LR up linearly.
        min_lr_ratio: LR at the end of the cosine decay, as a share of ``learning_rate``.
        gradient_checkpointing: recompute activations in backward (less memory, ~20-30% slower).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (if installed).
        loss_chunk_size: supervised tokens per LM-head chunk of the loss; the full
            ``[tokens, vocab]`` logits are never built (peak extra memory ~ chunk × vocab × 4 bytes).
        generation: decoding settings of ``medsft predict``.
        lora: train low-rank adapters (peft) instead of all parameters; ``None``: full fine-tuning. The
            export merges them into the base weights (and also saves the bare adapter).
        on_nonfinite_loss: a NaN/inf training loss ``error`` stops the run naming the batch's rows
            (``file:line``); ``skip`` warns, counts (``train_nonfinite_skipped``) and skips that batch's
            update (single process only: under DDP the other ranks would wait for it).
        fused_adamw: PyTorch's fused AdamW kernel for ``optimizer`` ``adamw`` (one kernel per step, no per-parameter
            temporaries; ``None``: on for CUDA and CPU, off elsewhere and under ``*-mixed`` precision, where Lightning
            refuses gradient clipping with it). On the tiny CPU model 6x faster than foreach. ``true`` with another
            optimizer is an error.
        kahan_summation: the switch before ``optimizer``: ``true`` means ``optimizer: kahan``, ``false`` means
            ``optimizer: adamw``, ``None`` (default) leaves it to ``optimizer``; with another ``optimizer`` an error.
        optimizer: ``auto`` (default: ``adamw8bit_sr`` for bf16 weights, ``kahan`` for fp16, ``adamw`` for fp32),
            ``adamw`` (torch; bf16 weights round most updates at lr 1e-5 away), ``kahan`` (torch-optimi, Kahan
            compensation: +2 B/param, bf16 moments that drift from fp32's over long runs) or ``adamw8bit_sr`` (torchao,
            8-bit moments: -2 B/param against adamw, bf16 weights stochastically rounded). Measured per choice in
            benchmarks/README.md; bytes per parameter in ``medsft memory``.
        optimizer_in_backward: step each weight inside backward as soon as its gradient is complete and free that
            gradient (-2 B/param for bf16 weights, less the largest gradient). Refused with gradient accumulation,
            gradient clipping and several devices (see ``optim_backward.py``).
        compile_layers: ``torch.compile`` each decoder layer (GPU speed; the first steps compile, minutes on a CPU).
    """

    predict_engine = None  # ``medsft predict --engine vllm``: a generation.vllm_engine.VllmEngine decodes instead

    def __init__(
        self,
        model_name_or_path: str = hub.TINY_MODEL,
        model_revision: str | None = None,
        cache_dir: str | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = True,
        attn_implementation: str = "sdpa",
        loss_chunk_size: int = 1024,
        generation: Generation | None = None,
        fused_adamw: bool | None = None,
        on_nonfinite_loss: Literal["error", "skip"] = "error",
        lora: LoraSettings | None = None,
        kahan_summation: bool | None = None,
        optimizer: Literal["auto", "adamw", "kahan", "adamw8bit_sr"] = "auto",
        optimizer_in_backward: bool = False,
        compile_layers: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Nested settings arrive as dataclasses (Python) or dicts (LightningCLI's saved config, a checkpoint's
        # hyper_parameters): objects here, plain dicts in hparams, so every checkpoint loads with weights_only=True.
        self.generation = as_dataclass(Generation, generation) or Generation()
        self.lora = as_dataclass(LoraSettings, lora)
        for key, value in (("generation", generation), ("lora", lora)):
            if dataclasses.is_dataclass(value):
                self.hparams[key] = dataclasses.asdict(value)
        self.model = None
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self._step_started: float | None = None
        self.nonfinite_skipped = 0
        # ModelParallelStrategy (FSDP2): the sharded root unit around self.model (sharding.LossRoot). Kept out of
        # the registered submodules: its parameters are self.model's, under the same state-dict names.
        object.__setattr__(self, "fsdp_root", None)

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None or self.predict_engine is not None:  # vLLM loads the model in its own process
            return
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        path = hub.resolve_model(hp.model_name_or_path, revision=hp.model_revision, cache_dir=hp.cache_dir)
        dtype = PRECISION_DTYPES.get(str(self.trainer.precision) if self._trainer else "", torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=hp.attn_implementation)
        if not self._trainer or self.trainer.strategy.root_device.type == "cpu":
            own_aligned_memory(self.model)
        self.model.train()  # from_pretrained returns eval mode; HF checkpointing only acts in train mode
        self.model.config.use_cache = False
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:
            self.model = apply_lora(self.model, self.lora)
        if hp.compile_layers:
            for layer in base_model(self.model).model.layers:
                layer.compile()
        if self.device_mesh is not None:  # only ModelParallelStrategy sets a device mesh
            object.__setattr__(self, "fsdp_root", shard_causal_lm(self.model, self.device_mesh))
        n_params = sum(p.numel() for p in self.model.parameters())
        rank_zero_info(f"[model] {hp.model_name_or_path}: {n_params / 1e6:.1f}M parameters, {dtype}, "
                       f"gradient checkpointing {'on' if hp.gradient_checkpointing else 'off'}")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss_sum, num_supervised, num_correct)`` of a batch, from hidden states in LM-head chunks."""
        lm = base_model(self.model)  # under LoRA the adapters live inside the base model's layers
        # Packed rows (position restarts mark example boundaries) in the layout this model's attention reads as
        # packed: [batch, L] for sdpa/eager, one flat row with cu_seq_lens for flash-attention (see packing.py).
        input_ids, labels, inputs = packed_model_inputs(batch, lm.config._attn_implementation)
        if self.fsdp_root is not None:  # FSDP2: the loss must run inside the root unit's forward (see sharding.py)
            return self.fsdp_root(input_ids, labels, self.hparams.loss_chunk_size, **inputs)
        return lm_loss(lm, input_ids, labels, self.hparams.loss_chunk_size, **inputs)

    # -- training ----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        hp = self.hparams
        for optimizer, config in zip(self.trainer.optimizers, self.trainer.lr_scheduler_configs or [None]):
            changed = sync_optimizer_hparams(optimizer, config.scheduler if config else None, hp.learning_rate,
                                             tuple(hp.betas), [hp.weight_decay, 0.0])
            if changed:
                rank_zero_info("[resume] the checkpoint's optimizer had other settings; the config's apply: "
                               + ", ".join(changed))
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        note = align_val_check(self.trainer)  # the interval is recomputed whenever the train dataloader reloads
        if note:
            rank_zero_info(note)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss_sum, n_tokens, _ = self(batch)
        if not torch.isfinite(loss_sum):
            return self._nonfinite(loss_sum, batch, batch_idx)
        if "window_tokens" in batch:
            # Token mean over the whole optimizer step on all ranks: Lightning divides by the number
            # of accumulation steps and DDP averages over ranks, so scale both back.
            window = batch["window_tokens"][0].to(loss_sum.dtype)
            loss = loss_sum / window * self.trainer.accumulate_grad_batches * self.trainer.world_size
        else:
            loss = loss_sum / n_tokens.clamp(min=1)
        self.log("train_loss", loss_sum.detach() / n_tokens.clamp(min=1), prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        self._batch_tokens = (n_tokens.detach(), batch["attention_mask"].sum())
        return loss

    def _nonfinite(self, loss_sum: torch.Tensor, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """A NaN/inf loss: stop with the rows' ``file:line`` (default), or skip this batch's update."""
        ids = [i for i in batch["row_id"].flatten().tolist() if i >= 0] if "row_id" in batch else []
        data = getattr(self.trainer, "datamodule", None)
        where = getattr(getattr(data, "train_rows", None), "where", None)
        rows = [where[i] if where and i < len(where) else f"training row {i}" for i in ids]
        message = (f"non-finite training loss ({loss_sum.item()}) at step {self.trainer.global_step} (epoch "
                   f"{self.trainer.current_epoch}, batch {batch_idx}); its rows: {', '.join(rows) or 'unknown'}. "
                   "Check those rows (medsft preview) and the learning rate")
        if self.hparams.on_nonfinite_loss == "error":
            raise FloatingPointError(message + ", or set model.on_nonfinite_loss=skip to skip such batches.")
        self.nonfinite_skipped += 1
        rank_zero_warn(f"{message}. Skipped (model.on_nonfinite_loss=skip), {self.nonfinite_skipped} so far.")
        self.log("train_nonfinite_skipped", float(self.nonfinite_skipped))
        return None  # Lightning skips backward and the optimizer step for this batch

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # After backward and (on the last micro-batch) the optimizer step: the whole step's time.
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        if elapsed > 0:
            supervised, total = self._batch_tokens
            self.log("train_supervised_tokens_per_s", supervised.float() / elapsed)
            self.log("train_tokens_per_s", total.float() / elapsed)

    # -- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # Re-create the metric states under this loop's grad mode (a validate() before fit() runs
        # under inference_mode; its inference tensors could not be updated later otherwise).
        self.val_loss.reset()
        self.val_acc.reset()
        # bf16-true converts the whole module, metric states included, to bf16: val_loss would be logged rounded
        # to bf16's step (0.0625 between 8 and 16: 11.96 as 12.0), blind to the improvements checkpointing and
        # early stopping watch for. The token-weighted sums stay fp32.
        self.val_loss.set_dtype(torch.float32)
        self.val_acc.set_dtype(torch.float32)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_tokens, correct = self(batch)
        if n_tokens > 0:  # weighted means = exact token means over the whole split
            self.val_loss.update(loss_sum / n_tokens, weight=n_tokens)
            self.val_acc.update(correct / n_tokens, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        stage = "test" if self._trainer is not None and self.trainer.testing else "val"
        metrics = {"loss": loss, "ppl": torch.exp(loss), "token_acc": self.val_acc.compute()}
        self.log_dict({f"{stage}_{name}": value for name, value in metrics.items()}, prog_bar=True)

    test_step = validation_step
    on_test_epoch_start, on_test_epoch_end = on_validation_epoch_start, on_validation_epoch_end

    # -- prediction ----------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        if self.fsdp_root is not None:
            raise RuntimeError("medsft predict with ModelParallelStrategy (FSDP2) is not supported: each rank decodes "
                               "its own questions, so the ranks' shard gathers would not line up. Predict with "
                               "--trainer.strategy ddp, or from the exported <run>/hf_model")
        if self.predict_engine is not None:  # no model in this process
            return
        self.model.eval()
        self.model.config.use_cache = True
        if getattr(self.model, "is_gradient_checkpointing", False):
            self.model.gradient_checkpointing_disable()
        torch.manual_seed(self.generation.seed)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """Answer a batch of question rows (with ``prompt_ids``); one dict per row."""
        tokenizer, prompts = self.trainer.datamodule.load_tokenizer(), [r["prompt_ids"] for r in batch]
        outputs = (generate_batch(self.model, tokenizer, prompts, self.generation) if self.predict_engine is None
                   else self.predict_engine.generate(tokenizer, prompts, self.generation))
        return [{"id": r["id"], "question": r["question"], **o} for r, o in zip(batch, outputs)]

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["medsft_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            optim.check_resume(self, checkpoint)
            restore_rng(checkpoint.get("medsft_rng"))

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        return optim.configure(self)
