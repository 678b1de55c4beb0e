"""``model.optimizer`` and ``model.optimizer_in_backward``: what each setting resolves to, what is refused, the
weights of a step inside backward against an ordinary step, and exact save / restore of every choice's state.

The models here are tiny Qwen3s with a 512-token vocabulary (bf16 matmuls of this size cost nothing even where the
CPU has no bf16 support); the loss is medsft's own (``training.loss.lm_loss``), with gradient checkpointing and a
tied LM head as in a real run.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from medsft_lightning.training import optim, optim_choice
from medsft_lightning.training.loss import lm_loss
from medsft_lightning.training.optim_backward import StepInBackward

CONFIG = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)


@pytest.mark.parametrize(("choice", "weights", "kahan", "expected"), [
    ("auto", "bf16", None, "adamw8bit_sr"), ("auto", "fp16", None, "kahan"), ("auto", "fp32", None, "adamw"),
    ("kahan", "fp32", None, "adamw"), ("adamw", "bf16", None, "adamw"), ("adamw8bit_sr", "fp32", None, "adamw8bit_sr"),
    ("auto", "bf16", True, "kahan"), ("auto", "bf16", False, "adamw"), ("kahan", "bf16", True, "kahan"),
])
def test_each_setting_resolves_to_one_optimizer(choice, weights, kahan, expected):
    assert optim_choice.resolve(choice, weights, kahan) == expected


@pytest.mark.parametrize(("model", "trainer", "message"), [
    ({"optimizer": "adam"}, {}, "--model.optimizer='adam': use one of auto, adamw, kahan, adamw8bit_sr"),
    ({"optimizer": "adamw8bit_sr", "kahan_summation": True}, {"precision": "bf16-true"},
     "--model.kahan_summation=True contradicts --model.optimizer='adamw8bit_sr': drop model.kahan_summation "
     "(replaced by model.optimizer; True meant 'kahan')"),
    ({"optimizer": "adamw8bit_sr"}, {"precision": "16-true"}, "stochastic rounding is for bf16 weights"),
    ({"optimizer": "kahan", "fused_adamw": True}, {"precision": "bf16-true"},
     "--model.fused_adamw=True: PyTorch's fused kernel is torch's AdamW"),
    ({"optimizer_in_backward": True}, {"accumulate_grad_batches": 2},
     "--trainer.accumulate_grad_batches=2: model.optimizer_in_backward steps each weight"),
    ({"optimizer_in_backward": True}, {"gradient_clip_val": 1.0}, "--trainer.gradient_clip_val=1.0: "),
    ({"optimizer_in_backward": True}, {"devices": 2}, "before gradients are averaged across processes"),
    ({"optimizer_in_backward": True}, {"strategy": "ddp"}, "--trainer.strategy='ddp'"),
])
def test_what_cannot_run_is_refused_with_one_line_each(model, trainer, message):
    found = optim_choice.problems(model, trainer)
    assert len(found) == 1 and message in found[0], found


def test_the_cli_refuses_optimizer_in_backward_with_the_demos_clipping(tmp_path, monkeypatch):
    from medsft_lightning.cli import ConfigError, MedSFTCLI
    from tests.test_cli import DEMO

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        MedSFTCLI(args=["--config", DEMO, "--model.optimizer_in_backward", "true",
                        "--trainer.accumulate_grad_batches", "2"], run=False)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 3, lines  # one line per problem, both named
    assert "--trainer.gradient_clip_val=1.0" in lines[1] + lines[2]
    assert "--trainer.accumulate_grad_batches=2" in lines[1] + lines[2]


def groups(model) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=gen)
        labels = ids.clone()
        labels[:, :5] = -100  # a masked prompt, as in real rows
        out.append((ids, labels))
    return out


@pytest.fixture(scope="module")
def init():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(CONFIG)


def train(model, opt, data) -> None:
    for ids, labels in data:
        loss_sum, n, _ = lm_loss(model, ids, labels, 16, attention_mask=torch.ones_like(ids))
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()


def fresh(init, choice: str, dtype: torch.dtype, in_backward: bool):
    model = copy.deepcopy(init).to(dtype).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, optim.build(choice, groups(model), lr=1e-3, betas=(0.9, 0.999), in_backward=in_backward)


CASES = [("adamw", torch.float32), ("adamw", torch.bfloat16), ("kahan", torch.bfloat16),
         ("adamw8bit_sr", torch.float32), ("adamw8bit_sr", torch.bfloat16)]


@pytest.mark.parametrize(("choice", "dtype"), CASES)
def test_stepping_inside_backward_gives_the_ordinary_steps_weights(init, choice, dtype):
    rounded = choice == "adamw8bit_sr" and dtype == torch.bfloat16
    # Stochastic rounding: one random stream for the whole optimizer, one per parameter in backward, so from the
    # same weights and gradient the two round a weight up or down independently: after one step they differ by at
    # most one bf16 step of the weight (after more, the gradients differ too).
    data = batches(1 if rounded else 3)
    torch.manual_seed(1)
    plain, plain_opt = fresh(init, choice, dtype, in_backward=False)
    train(plain, plain_opt, data)
    torch.manual_seed(1)
    hooked, hooked_opt = fresh(init, choice, dtype, in_backward=True)
    assert isinstance(hooked_opt, StepInBackward)
    train(hooked, hooked_opt, data)
    assert all(p.grad is None for p in hooked.parameters())  # every gradient was freed as soon as it was used
    differ = []
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        if rounded:
            ulp = torch.finfo(torch.bfloat16).eps * a.float().abs().clamp(min=2**-126)  # 2^-7 of the weight
            assert ((a.float() - b.float()).abs() <= ulp).all(), name
            differ.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), name
    assert not rounded or sum(differ) > len(differ) // 2  # the draws really differ: the bound is what is tested
    if choice == "adamw8bit_sr":  # the 8-bit moments were really used (tensors of >= 4,096 values)
        assert any(hasattr(s["exp_avg"], "codes") for s in hooked_opt.state.values())


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def plain_tensors_only(value) -> bool:
    if isinstance(value, dict):
        return all(plain_tensors_only(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(plain_tensors_only(v) for v in value)
    return type(value) is torch.Tensor or value is None or isinstance(value, (bool, int, float, str))


@pytest.mark.parametrize(("choice", "dtype", "in_backward"), [
    *[(choice, dtype, False) for choice, dtype in CASES],
    ("kahan", torch.bfloat16, True),  # torch-optimi counts steps per group: kept per parameter in backward
    ("adamw8bit_sr", torch.bfloat16, True),
])
def test_state_saved_and_restored_continues_bit_for_bit(init, choice, dtype, in_backward):
    """2 steps, save (state dict + the RNG, as medsft's checkpoints do), 2 more; a new model and optimizer restored
    from the save take the same 2 steps to the same weights, bit for bit (stochastic rounding included)."""
    first, rest = batches(2, seed=0), batches(2, seed=1)
    model, opt = fresh(init, choice, dtype, in_backward)
    train(model, opt, first)
    saved = round_trip({"weights": copy.deepcopy(model.state_dict()), "optimizer": opt.state_dict(),
                        "rng": torch.get_rng_state()})
    assert plain_tensors_only(saved["optimizer"])  # loads with weights_only=True without torchao imported first
    train(model, opt, rest)

    again, again_opt = fresh(init, choice, dtype, in_backward)
    again.load_state_dict(saved["weights"])
    again_opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    train(again, again_opt, rest)
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name
    kinds = {type(v).__name__ for s in again_opt.state.values() for v in s.values()}
    if choice == "adamw8bit_sr":
        inner = next(iter(again_opt.opts.values())) if in_backward else again_opt
        assert type(inner).__name__ == "AdamW8bitSR"
        assert any("OptimState8bit" in k for k in kinds)  # restored as 8-bit moments, not dequantized copies


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, init):
    path = tmp_path_factory.mktemp("small-qwen3")
    init.save_pretrained(path)
    return path


@pytest.mark.parametrize(("choice", "in_backward"), [("kahan", False), ("adamw8bit_sr", False), ("adamw8bit_sr", True)])
def test_a_lightning_checkpoint_resumes_bf16_states_bit_for_bit(tmp_path, small_folder, choice, in_backward):
    """bf16-true through the real Trainer: 6 steps straight, or 3 steps (an epoch) saved to last.ckpt and a new
    Trainer resumed from that file (``weights_only=True``, as ``medsft fit --ckpt_path`` loads it) for 3 more: the
    same weights, bit for bit, 8-bit moments, Kahan compensations and stochastic rounding's RNG included. (The CLI
    refuses half precision on the CPU, so ``tests/test_resume.py``'s kill-and-resume runs fp32 weights.)"""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medsft_lightning.training.module import MedSFTModule

    # One batch every step: Lightning restarts a plain DataLoader's epoch on resume (medsft's own sampler skips what
    # was trained, tests/test_resume.py), so only the optimizer state and the RNG can make the runs differ.
    ids, labels = batches(1, seed=2)[0]
    loader = torch.utils.data.DataLoader([{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}]
                                         * 3, batch_size=None)

    def fit(run: str, max_steps: int, ckpt_path: str | None = None):
        L.seed_everything(0)
        module = MedSFTModule(str(small_folder), optimizer=choice, optimizer_in_backward=in_backward,
                              gradient_checkpointing=True, loss_chunk_size=16, learning_rate=1e-3, warmup_ratio=0.0,
                              min_lr_ratio=1.0)  # a constant LR: the 3-step run has the same schedule
        saver = ModelCheckpoint(dirpath=tmp_path / run, save_last=True, save_top_k=0, save_on_train_epoch_end=True)
        trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=max_steps, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[saver], gradient_clip_val=None if in_backward else 1.0)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)
        return module

    straight = fit("straight", 6)
    fit("first", 3)
    resumed = fit("resumed", 6, ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name


@pytest.mark.parametrize(("written", "in_backward", "resumed"), [("kahan", False, "adamw8bit_sr"),
                                                                ("adamw8bit_sr", True, "kahan")])
def test_resuming_into_another_optimizer_is_refused_naming_the_flag(tmp_path, small_folder, written, in_backward,
                                                                     resumed):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medsft_lightning.training.module import MedSFTModule

    ids, labels = batches(1, seed=3)[0]
    loader = torch.utils.data.DataLoader([{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}],
                                         batch_size=None)

    def fit(choice: str, ckpt_path: str | None = None):
        module = MedSFTModule(str(small_folder), optimizer=choice, optimizer_in_backward=in_backward and not ckpt_path,
                              loss_chunk_size=16)
        trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=2, logger=False, limit_val_batches=0,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)])
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)

    fit(written)
    with pytest.raises(ValueError) as err:
        fit(resumed, str(tmp_path / "last.ckpt"))
    assert str(err.value) == (f"the checkpoint's optimizer state was written by model.optimizer={written}, this run "
                              f"builds {resumed}: resume with --model.optimizer {written} (or start a new run from "
                              "its weights)")


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_new_lr_on_resume_reaches_torchaos_tensor_lr(init, in_backward):
    """torchao keeps the LR as an fp32 tensor: a fresh run reports no change (1e-5 is not exact in fp32), and a
    resumed run's new LR is set in place, so its step still runs (a float LR would stop it)."""
    from medsft_lightning.training.resume import sync_optimizer_hparams

    model, opt = fresh(init, "adamw8bit_sr", torch.bfloat16, in_backward)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert sync_optimizer_hparams(opt, sched, 1e-3, (0.9, 0.999), [0.01, 0.0]) == []
    assert sync_optimizer_hparams(opt, sched, 2e-3, (0.9, 0.999), [0.01, 0.0]) == ["initial_lr: 0.001 → 0.002"]
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([1e-3, 1e-3])  # 2e-3 x 0.5
    train(model, opt, batches(1))
