"""Generation metrics: CJK-aware ROUGE-L with hand-computed values, and the callback under a tiny Trainer."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.functional.text.rouge import rouge_score

from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.generation import metrics as genmetrics
from medsft_lightning.generation.generate import Generation, check_room
from medsft_lightning.generation.metrics import GenerationMetrics, cjk_tokens, rouge_l_f1
from medsft_lightning.training.module import MedSFTModule
from tests.conftest import make_rows, write_jsonl

# torchmetrics computes in float32
F32 = 1e-6


def test_tokens_one_per_cjk_character_words_for_latin_and_no_punctuation():
    assert cjk_tokens("ct检查: 正常, 2 次") == ["ct", "检", "查", "正", "常", "2", "次"]
    assert cjk_tokens("多喝水，注意休息。") == list("多喝水注意休息")
    assert cjk_tokens("β受体阻滞剂 beta_blocker") == ["β", "受", "体", "阻", "滞", "剂", "beta", "blocker"]


def test_rouge_l_english_matches_hand_count_and_torchmetrics_default():
    # "the patient has fever" is the LCS: 4 of 5 tokens each side -> P = R = F1 = 0.8
    pred, ref = "The patient has a fever.", "the patient has no fever"
    assert rouge_l_f1([pred], [ref]) == pytest.approx(0.8, abs=F32)
    default = rouge_score(pred, ref, rouge_keys="rougeL")["rougeL_fmeasure"].item()
    assert rouge_l_f1([pred], [ref]) == default  # ASCII text: same tokens as torchmetrics' default
    assert rouge_l_f1(["Rest and drink water."], ["rest and drink water"]) == 1.0


def test_rouge_l_chinese_character_level_where_the_default_gives_zero():
    pred, ref = "多喝水，注意休息。", "注意休息，多喝温水。"
    # tokens: 7 and 8 characters; LCS "注意休息" = 4 (the order of "多喝水" is reversed) -> 2*4/(7+8) = 8/15
    assert rouge_l_f1([pred], [ref]) == pytest.approx(8 / 15, abs=F32)
    # torchmetrics' default normalizer turns every Chinese character into a space: nothing left to score
    assert rouge_score(pred, ref, rouge_keys="rougeL")["rougeL_fmeasure"].item() == 0.0
    assert rouge_score(pred, pred, rouge_keys="rougeL")["rougeL_fmeasure"].item() == 0.0
    assert rouge_l_f1([pred], [pred]) == 1.0


def test_rouge_l_mixed_full_width_and_mean_over_pairs():
    # NFKC + lower case: "ＣＴ检查" == "ct检查" -> 1.0; vs "ct 检查正常": LCS 3 of 3 and 5 -> 6/8
    assert rouge_l_f1(["ＣＴ检查"], ["ct检查"]) == 1.0
    assert rouge_l_f1(["ＣＴ检查"], ["ct 检查正常"]) == pytest.approx(0.75, abs=F32)
    assert rouge_l_f1(["多喝水", "", "rest"], ["多喝水", "休息", "sleep"]) == pytest.approx(1 / 3, abs=F32)
    with pytest.raises(ValueError, match="1 predictions and 2 references"):
        rouge_l_f1(["a"], ["a", "b"])


def test_rejects_negative_rows():
    with pytest.raises(ValueError, match="gen_metrics.num_rows=-1"):
        GenerationMetrics(num_rows=-1)


def fit(tmp_path, model_dir, callback: GenerationMetrics, steps: int) -> str:
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(12, answer_words=3))
    dm = MedicalDataModule(dataset=str(data), tokenizer=str(model_dir), batch_size=2, max_length=96,
                           val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    model = MedSFTModule(str(model_dir), learning_rate=1e-3, gradient_checkpointing=True,
                         cache_dir=dm.hparams.cache_dir)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=1, num_sanity_val_steps=1,
                        logger=CSVLogger(tmp_path / "runs"), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], use_distributed_sampler=False)
    trainer.fit(model, dm)
    assert model.model.training and model.model.is_gradient_checkpointing and not model.model.config.use_cache
    return trainer.log_dir


def metric_rows(log_dir: str) -> list[dict]:
    with open(f"{log_dir}/metrics.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def spy_generate(monkeypatch) -> list[list[dict]]:
    calls = []

    def spy(model, tokenizer, prompts, settings):
        out = real(model, tokenizer, prompts, settings)
        calls.append(out)
        return out

    real = genmetrics.generate_batch
    monkeypatch.setattr(genmetrics, "generate_batch", spy)
    return calls


def test_callback_logs_rouge_of_its_generations_at_each_validation(tmp_path, tiny_dir, monkeypatch):
    calls = spy_generate(monkeypatch)
    callback = GenerationMetrics(num_rows=3, batch_size=2, generation=Generation(max_new_tokens=4))
    with pytest.warns(UserWarning, match=r"--gen_metrics.generation.max_new_tokens=4 is below the longest reference"):
        log_dir = fit(tmp_path, tiny_dir, callback, steps=2)  # at fit start: the references are longer than 4
    # 2 validations (steps 1 and 2; the sanity check is skipped), each 3 rows in batches of 2 + 1
    assert [len(c) for c in calls] == [2, 1, 2, 1]
    logged = [r for r in metric_rows(log_dir) if r.get("val_gen/rougeL")]
    assert [int(r["step"]) for r in logged] == [1, 2]
    references = validation_answers(tmp_path, tiny_dir)
    for row, first, second in zip(logged, calls[0::2], calls[1::2]):
        outputs = first + second
        answers = [o["answer"] for o in outputs]
        assert 0.0 <= float(row["val_gen/rougeL"]) <= 1.0
        assert float(row["val_gen/rougeL"]) == pytest.approx(rouge_l_f1(answers, references), abs=F32)
        assert float(row["val_gen/think_format_rate"]) == sum(o["well_formed"] for o in outputs) / 3
        assert float(row["val_gen/truncation_rate"]) == sum(o["finish_reason"] == "length" for o in outputs) / 3
        assert float(row["val_gen/answer_chars"]) == pytest.approx(sum(map(len, answers)) / 3)


def validation_answers(tmp_path, model_dir) -> list[str]:
    dm = MedicalDataModule(dataset=str(tmp_path / "rows.jsonl"), tokenizer=str(model_dir), batch_size=2,
                           max_length=96, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    return [r["answer"] for r in dm.split_rows()[1].rows[:3]]


def test_callback_is_a_no_op_with_zero_rows(tmp_path, tiny_dir, monkeypatch):
    calls = spy_generate(monkeypatch)
    log_dir = fit(tmp_path, tiny_dir, GenerationMetrics(), steps=1)
    assert calls == []
    rows = metric_rows(log_dir)
    assert any(r.get("val_loss") for r in rows) and not any(k.startswith("val_gen/") for k in rows[0])


def test_check_room_warns_when_max_new_tokens_is_below_the_longest_reference(recwarn):
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_set=SimpleNamespace(
        rows=[{"num_supervised": n} for n in (12, 30, 25)])))
    with pytest.warns(UserWarning, match=r"--samples.generation.max_new_tokens=24 is below the longest reference "
                                         r"completion of the validation rows \(30 tokens; 2 of 3 are longer\)"):
        check_room(Generation(max_new_tokens=24), trainer, "samples.generation")
    recwarn.clear()
    check_room(Generation(max_new_tokens=30), trainer, "samples.generation")  # room for the longest: silent
    check_room(Generation(max_new_tokens=1), SimpleNamespace(datamodule=None), "samples.generation")  # no data
    assert not [w for w in recwarn if "max_new_tokens" in str(w.message)]
