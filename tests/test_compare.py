"""``medsft compare``: base vs fine-tuned on a tiny run folder built here (no training), and its offline report."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medsft_lightning.tools.compare import main
from tests.browser import browser
from tests.conftest import make_rows, offline_env, write_jsonl

REPO = Path(__file__).resolve().parents[1]
METRICS_CSV = """epoch,lr,step,train_loss,val_loss,val_ppl,val_token_acc
0,,0,,11.95,154150.2,0.0
0,0.005,4,11.53,,,
0,0.0049,9,10.12,,,
0,,10,,9.37,11770.5,0.0167
1,0.0041,14,9.02,,,
1,0.0030,19,8.41,,,
1,,21,,8.41,4495.2,0.0167
1,0.0012,24,8.02,,,
"""


def _rows() -> list[dict]:
    """``make_rows`` with every third answer in Chinese, so both tokenisations of ROUGE-L/BLEU are used."""
    rows = make_rows(24)
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row.update(question=f"头痛{i}怎么办？", answer=f"多喝水，注意休息，第{i}天不好转请就医。")
    return rows


def _perturbed_export(tiny_dir: Path, out: Path) -> None:
    """The tiny model with seeded noise on every weight, exported as ``medsft fit`` exports (``save_hf``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft_lightning.training.export import save_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5 * (p.std() if p.numel() > 1 else 1.0))
    save_hf(model, AutoTokenizer.from_pretrained(tiny_dir), out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    """A run folder as ``medsft fit`` leaves it: config.yaml, metrics.csv, hf_model (24 rows: 6 validation)."""
    root = tmp_path_factory.mktemp("compare")
    data = write_jsonl(root / "data" / "rows.jsonl", _rows())
    run = root / "runs" / "demo" / "version_0"
    run.mkdir(parents=True)
    config = {"model": {"model_name_or_path": str(tiny_dir), "model_revision": None, "cache_dir": None},
              "data": {"dataset": str(data), "dataset_revision": "master", "val_fraction": 0.25, "split_seed": 42,
                       "max_length": 256, "batch_size": 4, "system_prompt": "You are a careful doctor."}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    (run / "metrics.csv").write_text(METRICS_CSV, encoding="utf-8")
    _perturbed_export(tiny_dir, run / "hf_model")
    return run


@pytest.fixture(scope="module")
def compared(run_dir) -> Path:
    """``medsft compare --run RUN --max_new_tokens 16 --limit 4``, in-process; its output folder."""
    main(["--run", str(run_dir), "--max_new_tokens", "16", "--limit", "4", "--batch_size", "3"])
    return run_dir / "compare"


def _pairs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def test_compare_run_answers_the_run_validation_split_with_both_models(compared, run_dir):
    from medsft_lightning.data.datamodule import MedicalDataModule

    pairs, metrics = _pairs(compared), json.loads((compared / "metrics.json").read_text(encoding="utf-8"))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    _, val = MedicalDataModule(**cfg["data"], tokenizer=cfg["model"]["model_name_or_path"]).split_rows()
    assert [p["question"] for p in pairs] == [r["question"] for r in val.rows[:4]]  # --limit 4 of 6
    assert [p["reference_answer"] for p in pairs] == [r["answer"] for r in val.rows[:4]]
    assert metrics["questions"] == 4 and metrics["models"]["tuned"]["source"] == str(run_dir / "hf_model")
    assert metrics["system_prompt"] == "You are a careful doctor." and metrics["max_length"] == 256
    for key in ("base", "tuned"):
        forced = metrics["models"][key]["teacher_forced"]
        assert forced["rows"] == 6 and forced["tokens"] > 0  # teacher-forced on the whole validation split
        assert math.isclose(forced["perplexity"], math.exp(forced["val_loss"]), rel_tol=1e-9)
        assert 0 <= forced["token_accuracy"] <= 1 and 0 < forced["p_think_close"] < 1 and 0 < forced["p_im_end"] < 1
        for pair in pairs:
            out = pair[key]
            assert set(out) >= {"think", "answer", "finish_reason", "num_generated_tokens", "rougeL", "bleu4"}
            assert 1 <= out["num_generated_tokens"] <= 16 and 0 <= out["rougeL"] <= 1 and 0 <= out["bleu4"] <= 1
    base, tuned = (metrics["models"][k]["teacher_forced"]["val_loss"] for k in ("base", "tuned"))
    assert base != tuned  # two different models
    assert metrics["decoding"]["do_sample"] is True and metrics["decoding"]["temperature"] is not None  # resolved
    md = (compared / "report.md").read_text(encoding="utf-8")
    assert "| P(&lt;\\|im_end\\|&gt;) |" in md and md.count("\n### #") == 4


def test_report_html_figures_match_pairs_and_load_nothing(compared):
    pairs = _pairs(compared)
    page = compared / "report.html"
    with browser() as b:
        b.page.goto(page.as_uri())
        cells = b.page.eval_on_selector_all("table#metrics td[data-metric]",
                                            "els => els.map(e => [e.dataset.model, e.dataset.metric, e.dataset.value])")
        figures = {(m, k): float(v) if v else None for m, k, v in cells}
        paired = dict(b.page.eval_on_selector_all("[data-paired]", "els => els.map(e => [e.dataset.paired, "
                                                                    "e.dataset.value])"))
        cards = b.page.locator("div.card").count()
        series = b.page.eval_on_selector_all("svg#curves polyline", "els => els.map(e => e.dataset.series)")
        points = b.page.eval_on_selector_all("svg#curves polyline", "els => els.map(e => e.getAttribute('points'))")
        loaders = b.page.eval_on_selector_all("[src], [href], link, script, img, iframe, object, embed",
                                              "els => els.length")
        css = b.page.eval_on_selector_all("style", "els => els.map(e => e.textContent).join('')")
        summaries = b.page.eval_on_selector_all("div.card summary", "els => els.map(e => e.textContent)")
    assert b.requests == [page.as_uri()]  # the file itself, nothing else
    assert loaders == 0 and "url(" not in css and "@import" not in css
    assert cards == len(pairs) == 4
    assert sorted(series) == ["lr", "train_loss", "val_loss"] and all(len(p.split()) >= 3 for p in points)
    assert all(s.startswith("thinking (") for s in summaries) and len(summaries) >= 4  # 4 reference think blocks
    for key in ("base", "tuned"):
        outs = [p[key] for p in pairs]
        assert figures[key, "rougeL"] == pytest.approx(_mean(o["rougeL"] for o in outs), abs=1e-12)
        assert figures[key, "bleu4"] == pytest.approx(_mean(o["bleu4"] for o in outs), abs=1e-12)
        assert figures[key, "think_format_rate"] == _mean(float(o["well_formed"]) for o in outs)
        assert figures[key, "truncation_rate"] == _mean(float(o["finish_reason"] == "length") for o in outs)
        assert figures[key, "answer_tokens"] == _mean(o["answer_tokens"] for o in outs)
        assert figures[key, "val_loss"] > 0 and figures[key, "tokens_per_s"] > 0
    diffs = [p["tuned"]["rougeL"] - p["base"]["rougeL"] for p in pairs]
    assert int(paired["wins"]) == sum(d > 0 for d in diffs) and int(paired["losses"]) == sum(d < 0 for d in diffs)
    assert int(paired["ties"]) == sum(d == 0 for d in diffs) and int(paired["n"]) == 4
    assert float(paired["mean_diff"]) == pytest.approx(sum(diffs) / 4, abs=1e-12)
    assert float(paired["ci_low"]) <= float(paired["mean_diff"]) <= float(paired["ci_high"])


def test_questions_file_same_seed_same_answers_partial_references(tmp_path, tiny_dir):
    """The same model on both sides answers identically (same prompts, decoding, seed): every pair ties. Rows
    without a reference are answered but left out of the scores; only rows with think+answer are teacher-forced."""
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "full", "question": "What helps a mild headache?", "think": "Tension type.", "answer": "Rest."},
        {"id": "answer-only", "question": "发烧怎么办？", "answer": "多喝水，休息。"},
        {"id": "bare", "question": "Is ibuprofen safe with food?"},
    ])
    out = tmp_path / "out"
    main(["--base", str(tiny_dir), "--model", str(tiny_dir), "--questions", str(questions), "--out", str(out),
          "--max_new_tokens", "8", "--seed", "3"])
    pairs, metrics = _pairs(out), json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [p["id"] for p in pairs] == ["full", "answer-only", "bare"]
    assert all(p["base"] == p["tuned"] for p in pairs)
    assert pairs[2]["base"]["rougeL"] is None and "reference_answer" not in pairs[2]
    assert metrics["paired"]["n"] == 2 and metrics["paired"]["ties"] == 2 and metrics["paired"]["mean_diff"] == 0
    assert metrics["models"]["base"]["teacher_forced"]["rows"] == 1 and metrics["decoding"]["seed"] == 3
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="no-curves"' in page and "<svg" not in page and page.count('class="card"') == 3


def _exit_line(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    message = str(caught.value.code)
    assert "\n" not in message and message.startswith("medsft compare: error: "), message
    return message


def test_bad_input_gives_one_line_naming_it(tmp_path, tiny_dir, run_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "ok?"}\n{"question": "broken"\n{"question": 3}\n', encoding="utf-8")
    message = _exit_line(["--base", str(tiny_dir), "--model", str(tiny_dir), "--questions", str(questions)])
    assert f"{questions}:2: invalid JSON" in message and "1 more bad record" in message
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "ok?"}])
    assert "'/no/such/dir'" in _exit_line(["--base", "/no/such/dir", "--model", str(tiny_dir), "--questions",
                                           str(good)])
    bare = tmp_path / "run_without_export"
    bare.mkdir()
    shutil.copy(run_dir / "config.yaml", bare / "config.yaml")
    assert "no hf_model folder" in _exit_line(["--run", str(bare)])
    (bare / "config.yaml").unlink()
    assert "no config.yaml" in _exit_line(["--run", str(bare)])


@pytest.mark.e2e
def test_console_command_writes_report_and_errors_without_traceback(run_dir, cache_root, tmp_path):
    command = [sys.executable, "-m", "medsft_lightning.cli", "compare", "--run", str(run_dir)]
    out = subprocess.run([*command, "--max_new_tokens", "16", "--limit", "4", "--out", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=600, env=offline_env(cache_root), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("medsft compare: 4 questions")
    assert (tmp_path / "c" / "report.html").is_file() and len(_pairs(tmp_path / "c")) == 4
    bad = subprocess.run([*command, "--base", "/no/such/dir"], capture_output=True, text=True, timeout=600,
                         env=offline_env(cache_root), cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("medsft compare: error: --base='/no/such/dir'")


@pytest.mark.skipif(os.environ.get("MEDSFT_WRITE_SCREENSHOTS") != "1", reason="writes docs/report.png")
def test_write_report_screenshot(compared, tmp_path):
    """``MEDSFT_WRITE_SCREENSHOTS=1``: docs/report.png, of ``$MEDSFT_SCREENSHOT_RUN`` (e.g. a finished demo run,
    runs/demo/version_0) when set, else of the tiny run above."""
    page = compared / "report.html"
    if os.environ.get("MEDSFT_SCREENSHOT_RUN"):
        main(["--run", os.environ["MEDSFT_SCREENSHOT_RUN"], "--limit", "3", "--max_new_tokens", "96",
              "--out", str(tmp_path / "shot")])
        page = tmp_path / "shot" / "report.html"
    with browser(width=1280, height=900) as b:
        b.page.goto(page.as_uri())
        b.page.screenshot(path=str(REPO / "docs" / "report.png"), full_page=True)
