"""FSDP2 on CPU (ModelParallelStrategy, gloo): sharded loss, gradients and lockstep generation equal one
process's; fit with samples, sharded checkpoint, exact resume and a plain-transformers export with 2 real
``medsft fit`` processes."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_rows, offline_env, write_jsonl
from tests.test_resume import REPO, last_val_loss, write_config

pytestmark = pytest.mark.e2e  # 2 gloo processes and real medsft fit subprocesses

MEDSFT = str(Path(sys.executable).parent / "medsft")
FSDP2 = ["--trainer.strategy", "ModelParallelStrategy", "--trainer.strategy.data_parallel_size", "2",
         "--trainer.strategy.tensor_parallel_size", "1", "--trainer.devices", "2"]


# -- numerics: 2 ranks in this test's own process group ------------------------------------------------
def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 151_000, (4, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 30:] = -100  # rows with different supervised counts: the token mean needs the global count
    return ids, labels


def _tiny(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _generations(model, root, tiny: str) -> dict[str, list]:
    """Greedy and sampled answers to 3 prompts of different lengths, and a decode where row 0 stops at its first
    token and leaves the batch; ``root`` set: the FSDP2 model, every rank in lockstep."""
    from transformers import AutoTokenizer

    from medsft_lightning.generation.decode import decode
    from medsft_lightning.generation.generate import Generation, generate_batch, generation_mode, left_pad

    tokenizer, sharded = AutoTokenizer.from_pretrained(tiny), root is not None
    prompts = [tokenizer(t)["input_ids"] for t in ("Fever?", "What helps a headache?", "A cough for weeks: what next?")]
    with generation_mode(model, 0, root):
        greedy = generate_batch(model, tokenizer, prompts, Generation(max_new_tokens=8, do_sample=False))
        sampled = generate_batch(model, tokenizer, prompts, Generation(max_new_tokens=8, do_sample=True))
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
        free = decode(model, ids, mask, 8, [-1], sharded=sharded)
        stopped = decode(model, ids, mask, 8, [free[0][0]], sharded=sharded)
    return {"greedy": greedy, "sampled": sampled, "free": free, "stopped": stopped}


def _rank(rank: int, port: int, tiny: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from medsft_lightning.training.sharding import gather_full_state_dict, shard_causal_lm, unsharded_copy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = _tiny(tiny)
    root = shard_causal_lm(model, mesh)
    head = model.get_output_embeddings().weight
    assert isinstance(head, DTensor) and head is model.get_input_embeddings().weight  # still tied, now sharded
    generated = [_generations(model, root, tiny)]  # before any forward: FSDP2's first gathers are generation's
    ids, labels = _batch()
    mine = slice(2 * rank, 2 * rank + 2)
    loss_sum, _, _ = root(ids[mine], labels[mine], 16)
    # training_step's scaling: / global supervised tokens, x world size (FSDP2 averages gradients over ranks)
    (loss_sum / (labels[:, 1:] != -100).sum() * 2).backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    with torch.no_grad():
        before, _, _ = root(ids[mine], labels[mine], 16)
    generated.append(_generations(model, root, tiny))  # after a backward, and after a forward (root unsharded)
    with torch.no_grad():
        eval_sum, eval_count, _ = root(ids[mine], labels[mine], 16)
    sums = torch.stack([loss_sum.detach(), eval_sum, eval_count.float(), before])
    dist.all_reduce(sums)
    full = gather_full_state_dict(model)  # every rank takes part; rank 0 gets the tensors
    if rank == 0:
        plain = unsharded_copy(model, full)
        torch.save({"sums": sums, "grads": grads, "plain": plain.state_dict(), "generated": generated,
                    "plain_tied": plain.lm_head.weight is plain.model.embed_tokens.weight}, out)
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort a finished process there (SIGABRT, "terminate called
    # without an active exception"; seen in ~1 of 10 runs on CPU), which would fail a test whose work is done.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_loss_and_gradients_equal_one_process(tmp_path, tiny_dir):
    """Tied embeddings/LM head, gradient checkpointing on: every gradient of 2 ranks x 2 rows (FSDP2, loss in
    the root unit) equals 1 process x 4 rows, also after generating on both ranks in lockstep (greedy, sampled,
    a row leaving the batch: 1 process's tokens), and the gathered weights rebuild the unsharded model exactly."""
    import torch.multiprocessing as mp

    from medsft_lightning.training.loss import lm_loss

    out = tmp_path / "two.pt"
    mp.spawn(_rank, args=(_free_port(), str(tiny_dir), str(out)), nprocs=2)
    two = torch.load(out, weights_only=False)

    model = _tiny(str(tiny_dir))
    # Generation in lockstep on 2 ranks, before any forward and after a backward, gives 1 process's tokens; the
    # training loss and gradients after it (below) equal those of this process, which generated nothing.
    one = _generations(model, None, str(tiny_dir))
    assert two["generated"] == [one, one]
    assert [len(t) for t in one["stopped"]] == [1, 8, 8] and one["stopped"][1:] == one["free"][1:]
    assert [o["raw"] for o in one["sampled"]] != [o["raw"] for o in one["greedy"]]
    ids, labels = _batch()
    loss_sum, count, _ = lm_loss(model, ids, labels, 16)
    (loss_sum / count).backward()
    with torch.no_grad():
        eval_sum, _, _ = lm_loss(model, ids, labels, 16)
    assert two["sums"][0].item() == pytest.approx(loss_sum.item(), rel=1e-6)
    assert two["sums"][1].item() == pytest.approx(eval_sum.item(), rel=1e-6)
    assert two["sums"][2].item() == count.item() == 3 * 30 + 20
    assert two["sums"][1].item() == two["sums"][3].item()  # the same forward before and after generating
    for name, param in model.named_parameters():  # the embedding's includes the tied head's contribution
        torch.testing.assert_close(two["grads"][name], param.grad, rtol=1e-5, atol=1e-6, msg=name)  # max |g| 0.05
    assert two["plain_tied"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(two["plain"][name], tensor), name


# -- end to end: medsft fit with 2 FSDP2 processes ---------------------------------------------------------
def fit(work: Path, env: dict, log: str, kill_at_step: int = 0, *extra: str) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(work / "rows.jsonl", make_rows(25, answer_words=6))  # 22 train rows (int(25 * 0.9))
    config = write_config(work, data, {"log": str(work / log), "kill_at_step": kill_at_step})
    generating = ["--samples.num_samples", "2", "--samples.generation.max_new_tokens", "8", "--gen_metrics.num_rows",
                  "3", "--gen_metrics.batch_size", "2", "--gen_metrics.generation.max_new_tokens", "8",
                  "--samples.generation.do_sample", "false", "--gen_metrics.generation.do_sample", "false"]  # greedy
    return subprocess.run([MEDSFT, "fit", "--config", str(config), *generating, *extra], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


def samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def gen_metrics(run: Path) -> dict[int, tuple[float, ...]]:
    """Global step → (val_gen/rougeL, think_format_rate, answer_chars) from metrics.csv."""
    keys = ("val_gen/rougeL", "val_gen/think_format_rate", "val_gen/answer_chars")
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get(keys[0])]
    return {int(r["step"]): tuple(float(r[k]) for k in keys) for r in rows}


def rows_by_step(log: Path) -> dict[int, list[int]]:
    """Global step → the rows of both ranks (each rank appends its own line)."""
    steps: dict[int, list[int]] = {}
    for entry in map(json.loads, log.read_text().splitlines()):
        steps.setdefault(entry["step"], []).extend(entry["rows"])
    return {step: sorted(rows) for step, rows in steps.items()}


@pytest.mark.skipif(not Path(MEDSFT).exists(), reason="needs the installed medsft console script")
def test_fsdp2_fit_sharded_checkpoint_resume_and_export(tmp_path, cache_root):
    """3 runs of medsft fit (1 process; 2 FSDP2 processes killed; resumed), samples on: ~41 s on 2 idle cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft_lightning.training.checkpoints import read_sharded_checkpoint
    from medsft_lightning.training.export import export_checkpoint

    env = {**offline_env(cache_root), "PYTHONPATH": str(REPO)}
    one = fit(tmp_path / "one", env, "batches.jsonl", 0, "--data.batch_size", "4")
    assert one.returncode == 0, one.stderr[-3000:]

    work = tmp_path / "two"
    killed = fit(work, env, "killed.jsonl", 5, "--data.batch_size", "2", *FSDP2)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = work / "runs/r/version_0/checkpoints/last.ckpt"  # a folder: one shard file per rank + meta.pt
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 4
    assert all((last / f"__{r}_0.distcp").stat().st_size > 10_000_000 for r in (0, 1))  # weights + AdamW
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]  # swapped in, no leftovers

    resumed = fit(work, env, "resumed.jsonl", 0, "--data.batch_size", "2", *FSDP2, "--ckpt_path", "last",
                  "--export", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming epoch 0 after its first 4 micro-batches" in resumed.stderr + resumed.stdout
    first = json.loads((work / "resumed.jsonl").read_text().splitlines()[0])
    assert (first["step"], first["batch_idx"]) == (4, 4)
    # Killed after step 5 (steps 0-4 logged), resumed from step 4: together the 1-process run's rows, step by step.
    killed_rows = {s: rows for s, rows in rows_by_step(work / "killed.jsonl").items() if s < 4}
    assert {**killed_rows, **rows_by_step(work / "resumed.jsonl")} == rows_by_step(tmp_path / "one/batches.jsonl")
    run = work / "runs/r/version_1"
    assert last_val_loss(run) == pytest.approx(last_val_loss(tmp_path / "one/runs/r/version_0"), abs=1e-4)
    # Samples: both FSDP2 ranks generated in lockstep, rank zero alone wrote; the rounds (baseline + 4 validations,
    # 2 of them before the kill) and the greedy text are the 1-process run's.
    single, sharded = (samples(tmp_path / "one/runs/r/version_0"), samples(work / "runs/r/version_0") + samples(run))
    keys = [(x["round"], x["step"], x["sample"]) for x in sharded]
    assert keys == [(x["round"], x["step"], x["sample"]) for x in single] == [
        (r, s, i) for r, s in enumerate([0, 3, 6, 9, 12]) for i in (0, 1)]
    assert [x["raw"] for x in sharded] == [x["raw"] for x in single]
    assert all(x["num_generated_tokens"] == 8 for x in single)
    # gen_metrics (3 rows in batches of 2) alike; the killed run's metrics.csv was not flushed before the kill.
    one_gen = gen_metrics(tmp_path / "one/runs/r/version_0")
    # the answers have text (answer_chars > 0), so that comparing the figures below can fail
    assert sorted(one_gen) == [3, 6, 9, 12] and min(chars for *_, chars in one_gen.values()) > 0
    assert gen_metrics(run) == {step: one_gen[step] for step in (6, 9, 12)}

    # The export: plain transformers, tied head, the best checkpoint's weights exactly; and it generates.
    best = read_sharded_checkpoint(run / "checkpoints/best.ckpt")
    assert best["global_step"] == 12  # val_loss fell at every validation: best is the final model
    model = AutoModelForCausalLM.from_pretrained(run / "hf_model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best["state_dict"][f"model.{name}"]), name
    tokenizer = AutoTokenizer.from_pretrained(run / "hf_model")
    prompt = tokenizer("Question: what helps a headache?", return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=4, do_sample=False).shape[1] == prompt["input_ids"].shape[1] + 4
    # `medsft export FOLDER OUT`, in one process without a process group, writes the same weights.
    again = AutoModelForCausalLM.from_pretrained(export_checkpoint(run / "checkpoints/best.ckpt", tmp_path / "hf"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
