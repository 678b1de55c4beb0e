"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for Lightning's ``ModelParallelStrategy``, on CPU or GPU.

Each decoder layer is one FSDP unit; the root unit is :class:`LossRoot`, a small module around the causal
LM whose forward runs the decoder *and* the chunked loss. The root unit holds the embeddings, the final
norm and the LM head, which the tiny model and Qwen3-0.6B/1.7B/4B tie to the embeddings. FSDP2 gathers a
unit's parameters only inside that unit's forward (and its backward), and medsft's loss reads the LM-head
weight outside ``Qwen3ForCausalLM.forward``: computed anywhere but inside the root's forward, it would see
this rank's shard of the head. Gradients are reduce-scattered and averaged over the data-parallel ranks,
as DDP averages them, so ``training_step``'s token-mean scaling holds unchanged. Generation (samples,
gen_metrics) reads the head outside that forward too: every rank decodes in lockstep inside
:func:`~medsft_lightning.generation.wrapped.unsharded_root`.

Checkpoints are ``ModelParallelStrategy``'s folders (``torch.distributed.checkpoint`` shards, one file per
rank, plus Lightning's ``meta.pt``), swapped in whole by :class:`AtomicModelParallelStrategy`; the helpers
here load their weights into the shards and gather them for the export (reading such a folder in one
process: :func:`~medsft_lightning.training.checkpoints.read_sharded_checkpoint`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from medsft_lightning.generation.wrapped import base_model
from medsft_lightning.training.checkpoints import (
    clear_leftovers,
    is_sharded_checkpoint,
    load_checkpoint_file,
    swap_in_folder,
)
from medsft_lightning.training.loss import lm_loss
from medsft_lightning.training.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, check_sharded_checkpoint


class LossRoot(nn.Module):
    """The root FSDP unit: its forward is :func:`lm_loss`, so the root's parameters (embeddings, final norm,
    tied LM head) are gathered while the loss uses them, and their gradients are reduce-scattered after."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int, **inputs: Any):
        return lm_loss(self.lm, input_ids, labels, chunk_size, **inputs)


def shard_causal_lm(model: nn.Module, mesh) -> LossRoot:
    """``fully_shard`` every decoder layer of ``model`` over ``mesh['data_parallel']``, then the root.

    Args:
        model: a transformers causal LM (``model.model.layers`` are its decoder layers).
        mesh: the strategy's 2-D device mesh (``data_parallel`` x ``tensor_parallel``).

    Returns:
        The sharded :class:`LossRoot` around ``model``: call it for every forward that needs the loss.
    """
    from torch.distributed.fsdp import fully_shard

    tp = mesh["tensor_parallel"].size()
    if tp != 1:
        raise ValueError(
            f"--trainer.strategy.tensor_parallel_size={tp}: medsft shards the model with FSDP2 only (no tensor "
            "parallelism); set tensor_parallel_size: 1 and data_parallel_size: devices x num_nodes")
    if hasattr(model, "get_base_model"):
        raise ValueError("--model.lora is not supported with ModelParallelStrategy (FSDP2) yet (issue 6): train "
                         "LoRA without --trainer.strategy ModelParallelStrategy, or drop --model.lora")
    dp_mesh = mesh["data_parallel"]
    layers = base_model(model).model.layers
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh)
    root = LossRoot(model)
    fully_shard(root, mesh=dp_mesh)
    rank_zero_info(f"[fsdp2] {len(layers)} decoder layers + the root (embeddings, final norm, LM head) sharded "
                   f"over {dp_mesh.size()} ranks")
    return root


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose sharded checkpoint folders replace the previous one whole.

    Lightning writes a folder's shards in place: a kill while saving leaves it half old, half new. Here all
    ranks write into ``<name>.tmp-<step>`` (the same name on every rank) and, once every rank is done, rank
    zero swaps it in by renames (:func:`~medsft_lightning.training.checkpoints.swap_in_folder`). ``medsft fit`` turns a
    plain ``ModelParallelStrategy`` into this class (``MedSFTCLI.before_fit``). Whole-file checkpoints
    (``save_distributed_checkpoint: false``) go unchanged through the CheckpointIO, atomic already.
    """

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load (torch's own reader: ``.metadata`` through plain pickle), once the folder has been
        checked to run no code (:func:`~medsft_lightning.training.safe_dcp.check_sharded_checkpoint`)."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            check_sharded_checkpoint(path)
        return super().load_checkpoint(path, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        target = Path(self.broadcast(filepath))
        step = str(checkpoint.get("global_step", 0))
        tmp = target.with_name(f"{target.name}.tmp-{step}")
        if self.is_global_zero:
            clear_leftovers(target)  # what a killed earlier save of this name left
        self.barrier("atomic_save_cleared")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("atomic_save_written")  # every rank's shards, and rank zero's meta.pt, are written
        if self.is_global_zero:
            swap_in_folder(tmp, target, step)
        self.barrier("atomic_save_swapped")


def prepare_fsdp2(trainer) -> bool:
    """Adjust a trainer whose strategy is ``ModelParallelStrategy`` (FSDP2) before fit or validate; ``False``
    (and nothing done) for any other strategy.

    - Validation and test run under ``no_grad``, not ``inference_mode``: FSDP2 keeps each unit's all-gather
      buffers for its later gathers, and a buffer first allocated under inference mode (the baseline validation
      is the first forward) cannot be written by training afterwards ("Inplace update to inference tensor
      outside InferenceMode"). Lightning does this itself for gloo and FSDPStrategy, not for this strategy on NCCL.
    - A plain ``ModelParallelStrategy`` (what the README command and multi_gpu.yaml name) becomes
      :class:`AtomicModelParallelStrategy`: the subclass only overrides ``save_checkpoint`` and has no state of
      its own, so the built instance can take it on without re-wiring accelerator, precision and cluster.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, ModelParallelStrategy):
        return False
    trainer.validate_loop.inference_mode = trainer.test_loop.inference_mode = False
    if type(strategy) is ModelParallelStrategy:
        strategy.__class__ = AtomicModelParallelStrategy
    if strategy._save_distributed_checkpoint:
        rank_zero_info("[fsdp2] checkpoints are sharded folders, written beside the previous one (<name>.tmp-<step>) "
                       "and renamed into place once every rank has written: a kill while saving leaves a whole "
                       "checkpoint for --ckpt_path last")
    return True

def load_sharded_weights(module: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's weights (no optimizer state) into a sharded module; all ranks call it.

    Args:
        module: the sharded LightningModule (its state-dict names are the checkpoint's).
        path: a sharded checkpoint folder, or a whole ``.ckpt`` file (``save_distributed_checkpoint: false``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    if is_sharded_checkpoint(path):
        check_sharded_checkpoint(path)
        state = {"state_dict": get_model_state_dict(module)}
        # each rank reads its own shards; torch's reader and planner would unpickle .metadata and non-tensor
        # entries without restriction
        dcp.load(state, storage_reader=SafeFileSystemReader(Path(path)), planner=SafeLoadPlanner())
        set_model_state_dict(module, state["state_dict"])  # strict: a missing key fails
        return
    full = load_checkpoint_file(path)["state_dict"]
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True))


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole unsharded state dict on rank 0's CPU (empty elsewhere); a collective: all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def skeleton(config, dtype: torch.dtype):
    """A causal LM of ``config`` in ``dtype`` with no weights initialised (every one is loaded afterwards), its
    tied LM head tied."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # skip the random init (minutes for billions of weights)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    model.tie_weights()  # no_init_weights skips the tying too
    return model


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) transformers model with ``model``'s class, config and generation config, holding
    ``state`` (a full state dict; a tied LM head may be left out of it)."""
    plain = skeleton(model.config, next(iter(state.values())).dtype)  # every weight is overwritten below
    plain.generation_config = copy.deepcopy(model.generation_config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    untied = set(missing) - {name for name in missing if _is_tied(plain, name)}
    if unexpected or untied:
        raise RuntimeError(f"gathered weights do not fit {type(plain).__name__}: missing {sorted(untied)}, "
                           f"unexpected {sorted(unexpected)}")
    return plain


def _is_tied(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` shares its storage with another (loaded) parameter, like a tied LM head."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return name in params and any(p is params[name] and n != name for n, p in params.items())
