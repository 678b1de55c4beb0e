"""medsft predict --engine vllm: the same answers file as the default engine, resume after SIGKILL, clear refusals.

The vLLM tests (``e2e``) run vLLM's own Python: ``$MEDSFT_VLLM_PYTHON``, else ``<repo>/.vllm-venv`` (built once by
``ensure_vllm_venv`` on first use, ~2.5 min, needs PyPI). Each ``medsft predict --engine vllm`` starts one vLLM
worker (~30 s on 2 CPU cores). The client's protocol, settings mapping and refusals are tested without vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medsft_lightning.cli import cli_main
from medsft_lightning.generation.generate import STOP_TOKENS, Generation
from medsft_lightning.generation.vllm_engine import VllmEngine, VllmEngineError, sampling_params
from tests.conftest import offline_env, write_jsonl
from tests.test_predict import QUESTIONS, predict_cmd

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--model.generation.do_sample", "false", "--model.generation.max_new_tokens", "48"]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The Python with vLLM: ``$MEDSFT_VLLM_PYTHON``, else ``<repo>/.vllm-venv`` (built on first use)."""
    given = os.environ.get("MEDSFT_VLLM_PYTHON")
    if given:
        return given
    from medsft_lightning.tools.vllm_env import ensure_vllm_venv

    return ensure_vllm_venv(REPO / ".vllm-venv")


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("vllm-questions") / "questions.jsonl", QUESTIONS)


@pytest.fixture(scope="module")
def default_engine_answers(tmp_path_factory, tiny_dir, cache_root, questions) -> list[dict]:
    """The default (transformers) engine's greedy answers to the 13 questions, 48 new tokens."""
    out = tmp_path_factory.mktemp("hf-answers") / "answers.jsonl"
    proc = subprocess.run(predict_cmd(tiny_dir, questions, out) + GREEDY, cwd=out.parent,
                          env=offline_env(cache_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_lines(out)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def vllm_cmd(tiny_dir: Path, questions: Path, out: Path, python: str, batch: int) -> list[str]:
    return predict_cmd(tiny_dir, questions, out) + GREEDY + ["--engine", "vllm", "--vllm_python", python,
                                                             "--vllm_batch", str(batch)]


def test_sampling_params_carry_the_generation_settings():
    stop = [151645, 151643]
    greedy = sampling_params(Generation(max_new_tokens=7, do_sample=False, seed=3, presence_penalty=1.5), stop)
    assert greedy == {"max_tokens": 7, "stop_token_ids": stop, "ignore_eos": True, "presence_penalty": 1.5,
                      "repetition_penalty": 1.0, "seed": 3, "temperature": 0.0}
    resolved = Generation(max_new_tokens=5, repetition_penalty=1.2).resolved()  # Qwen3's sampling values
    assert sampling_params(resolved, stop) == {
        "max_tokens": 5, "stop_token_ids": stop, "ignore_eos": True, "presence_penalty": 0.0,
        "repetition_penalty": 1.2, "seed": 0, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    off = sampling_params(Generation(do_sample=True, temperature=1.0, top_p=0.0, top_k=0), stop)
    assert (off["top_p"], off["top_k"]) == (1.0, 0)  # top-p 0 and top-k 0 are off in the default engine too


STAND_IN = textwrap.dedent('''
    import json, sys
    config = json.loads(sys.argv[1])
    print("loading", config["model"], file=sys.stderr, flush=True)
    if config.get("seed") == 13:
        print("RuntimeError: the stand-in cannot load this model", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps({"ready": True, "vllm": "stand-in"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sampling = request["sampling"]
        if sampling.get("presence_penalty", 0) > 2:
            print(json.dumps({"error": "presence_penalty must be in [-2, 2]"}), flush=True)
            continue
        stop = sampling["stop_token_ids"][0]
        # prompt ending in 0: its last token, then the stop token; otherwise its last token max_tokens times
        out = [[p[-1], stop] if p[-1] == 0 else [p[-1]] * sampling["max_tokens"] for p in request["prompts"]]
        print(json.dumps({"outputs": [{"token_ids": o, "finish_reason": "?"} for o in out]}), flush=True)
''')


def test_engine_client_turns_worker_tokens_into_predict_answers(tmp_path, tiny_dir, tokenizer):
    """The client's side of the protocol against a stand-in worker (no vLLM): order, the stop cut and its
    ``finish_reason``, token counts, the think/answer fields, a refused request, a worker that dies loading."""
    worker = tmp_path / "stand_in.py"
    worker.write_text(STAND_IN, encoding="utf-8")
    engine = VllmEngine(sys.executable, tiny_dir, worker=worker)
    engine.start(max_model_len=64)
    try:
        settings = Generation(max_new_tokens=4, do_sample=False)
        answers = engine.generate(tokenizer, [[5, 11], [7, 0], [9, 42]], settings)
        stop = tokenizer.convert_tokens_to_ids(STOP_TOKENS[0])
        assert [a["num_generated_tokens"] for a in answers] == [4, 2, 4]
        assert [a["finish_reason"] for a in answers] == ["length", "stop", "length"]
        assert answers[0]["raw"] == tokenizer.decode([11] * 4)
        assert answers[1]["raw"] == tokenizer.decode([0, stop], skip_special_tokens=True)
        assert set(answers[2]) == {"think", "answer", "raw", "well_formed", "finish_reason", "num_generated_tokens"}
        with pytest.raises(VllmEngineError, match=r"vLLM: presence_penalty must be in \[-2, 2\]"):
            engine.generate(tokenizer, [[1]], Generation(do_sample=False, presence_penalty=3.0))
        assert engine.generate(tokenizer, [[3]], settings)[0]["num_generated_tokens"] == 4  # the worker goes on
    finally:
        proc = engine.proc
        engine.close()
    assert proc.returncode == 0 and engine.proc is None
    dying = VllmEngine(sys.executable, tiny_dir, seed=13, worker=worker)
    with pytest.raises(VllmEngineError, match="exited .status 1. while starting") as err:
        dying.start(max_model_len=64)
    assert "the stand-in cannot load this model" in str(err.value)  # its log's last lines
    dying.close()


@pytest.mark.parametrize("flags, message", [
    (["--vllm_python", "/nonexistent/python"], "--vllm_python='/nonexistent/python' cannot import vllm: install vLLM"),
    (["--ckpt_path", "/nonexistent/best.ckpt"], "--engine vllm loads a Hugging Face model folder, not --ckpt_path"),
    (["--trainer.strategy", "ddp", "--trainer.devices", "2"], "several processes (or FSDP2) would each start one"),
    (["--vllm_batch", "0"], "--vllm_batch=0: use 1 or more"),
    (["--model.generation.presence_penalty", "2.5"], "presence_penalty=2.5: vLLM takes -2 to 2"),
], ids=["no-vllm", "ckpt_path", "ddp", "vllm_batch-0", "presence_penalty"])
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_what_the_vllm_engine_cannot_do_is_one_error_line(tmp_path, tiny_dir, cache_root, flags, message):
    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS[:2])
    args = predict_cmd(tiny_dir, questions, tmp_path / "answers.jsonl")[3:] + ["--engine", "vllm", *flags]
    with pytest.raises(SystemExit) as err:
        cli_main(args)
    text = str(err.value.code)
    assert text.startswith("medsft: error: ") and message in text and "\n" not in text
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.e2e
def test_predict_vllm_missing_vllm_is_one_line_without_traceback(tmp_path, tiny_dir, cache_root, questions):
    proc = subprocess.run(vllm_cmd(tiny_dir, questions, tmp_path / "a.jsonl", "/nonexistent/python", 4),
                          cwd=tmp_path, env=offline_env(cache_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("medsft: error: --vllm_python='/nonexistent/python' cannot import vllm: install vLLM")
    assert "MEDSFT_VLLM_PYTHON" in last and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_predict_vllm_gives_the_default_engines_greedy_answers(tmp_path, tiny_dir, cache_root, questions,
                                                               vllm_python, default_engine_answers):
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run(vllm_cmd(tiny_dir, questions, out, vllm_python, 64), cwd=tmp_path,
                          env=offline_env(cache_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_lines(out)
    assert [a["id"] for a in lines] == [q["id"] for q in QUESTIONS]  # 13 lines, input order
    # token for token: the same text, token count and finish_reason (greedy fp32, the random tiny model)
    assert lines == default_engine_answers
    assert "[predict] decoding: greedy, max_new_tokens 48" in proc.stderr
    assert "[predict] engine vllm:" in proc.stderr and "batches of 64 questions" in proc.stderr


def is_worker(pid: int) -> bool:
    """Whether process ``pid`` is a running vLLM worker (Linux /proc; a zombie has no command line)."""
    try:
        return "vllm_worker.py" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return False


def worker_of(pid: int) -> int | None:
    """The vLLM worker among the children of process ``pid``, once it has started."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return next((child for child in map(int, children) if is_worker(child)), None)


@pytest.mark.e2e
def test_predict_vllm_resumes_after_sigkill(tmp_path, tiny_dir, cache_root, questions, vllm_python,
                                            default_engine_answers):
    out = tmp_path / "answers.jsonl"
    env = offline_env(cache_root)
    cmd = vllm_cmd(tiny_dir, questions, out, vllm_python, 1)  # one question per batch: a kill lands mid-run
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, worker = time.time() + 300, None
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 3):
        worker = worker or worker_of(proc.pid)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes().count(b"\n")  # complete lines
    assert 3 <= written < 13, "the kill must land mid-run"
    assert worker is not None or not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()
    with out.open("ab") as f:  # what a kill during a write leaves: half a line
        f.write(b'{"id": "q99", "question": "torn')
    rerun = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(300):  # meanwhile: the killed run's worker ends with it (PR_SET_PDEATHSIG, vLLM's own shutdown)
        if worker is None or not is_worker(worker):
            break
        time.sleep(0.1)
    else:
        rerun.kill()
        pytest.fail(f"the vLLM worker {worker} outlived the killed medsft predict by 30 s")
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    assert f"already holds {written} answer(s)" in stderr
    lines = read_lines(out)
    assert [a["id"] for a in lines] == [q["id"] for q in QUESTIONS]  # exactly 13, none twice, input order
    assert lines == default_engine_answers


@pytest.mark.e2e
def test_vllm_does_not_resume_the_default_engines_answers(tmp_path, tiny_dir, cache_root, vllm_python):
    """The engines draw samples differently: a file of the default engine's answers is not vLLM's to finish. The
    refusal comes before vLLM starts."""
    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS[:2])
    out, env = tmp_path / "answers.jsonl", offline_env(cache_root)
    proc = subprocess.run(predict_cmd(tiny_dir, questions, out) + GREEDY, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = out.read_bytes()
    proc = subprocess.run(vllm_cmd(tiny_dir, questions, out, vllm_python, 4), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and out.read_bytes() == before
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'medsft: error: {out} holds 2 answer(s) of another run (decoding.engine "hf" then, '
                           '"vllm" now)') and "Traceback" not in proc.stderr
    assert "starting vLLM" not in proc.stderr
