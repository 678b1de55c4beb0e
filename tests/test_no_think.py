"""``data.no_think_share``: training rows as Qwen3 non-thinking turns, as the shipped chat template writes them."""

from __future__ import annotations

from importlib import resources

import yaml

from medsft_lightning.data.collate import IGNORE_INDEX
from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.data.encoding import encode_rows
from medsft_lightning.data.formatting import no_think_row, with_no_think
from medsft_lightning.tools import preview
from tests.conftest import make_rows, write_jsonl

SYSTEM = "You are a careful doctor."


def test_the_tokenizer_carries_the_shipped_template(tokenizer):
    shipped = resources.files("medsft_lightning.hub").joinpath("templates/qwen3_chat_template.jinja")
    assert tokenizer.chat_template == shipped.read_text(encoding="utf-8")


def test_a_no_think_row_is_the_templates_non_thinking_turn_token_for_token(tokenizer):
    """The encoded row equals, token for token, the template's own rendering of that turn: the user turn with
    ``/no_think``, then what the template writes for a non-thinking answer (the prompt it renders with
    ``enable_thinking=False`` followed by the answer and ``<|im_end|>``); the empty think block is supervised."""
    rows = make_rows(2) + [{"question": "头痛怎么办？", "think": "考虑紧张性头痛。", "answer": "多休息，多喝水。"}]
    for row in rows:
        changed = no_think_row(row)
        (encoded,) = encode_rows([changed], tokenizer, system_prompt=SYSTEM, max_length=512)
        user = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"] + " /no_think"}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        expected = tokenizer(prompt + row["answer"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert encoded["input_ids"] == expected
        supervised = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
        assert tokenizer.decode(supervised) == f"<think>\n\n</think>\n\n{row['answer']}<|im_end|>"


def test_share_zero_leaves_rows_and_encoding_unchanged_and_a_share_picks_rows_by_seed(tmp_path, tiny_dir):
    rows = make_rows(20)
    assert with_no_think(rows, 0.0, 42) == (rows, []) and with_no_think(rows, 0.0, 42)[0] is rows
    picked, ids = with_no_think(rows, 0.25, 42)
    assert len(ids) == 5 and ids == with_no_think(rows, 0.25, 42)[1] != with_no_think(rows, 0.25, 7)[1]
    assert [r["question"].endswith(" /no_think") for r in picked] == [i in ids for i in range(20)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)

    def module(**extra) -> MedicalDataModule:
        dm = MedicalDataModule(dataset=str(data), tokenizer=str(tiny_dir), max_length=256,
                               cache_dir=str(tmp_path / "cache"), **extra)
        dm.setup("fit")
        return dm

    zero, half = module(no_think_share=0.0), module(no_think_share=0.5)
    direct = encode_rows(zero.train_rows.rows, zero.load_tokenizer(), system_prompt=zero.hparams.system_prompt,
                         max_length=256)
    assert [r["input_ids"] for r in zero.train_set.rows] == [e["input_ids"] for e in direct]
    assert zero.no_think_ids == [] and "train_no_think" not in zero.stats
    assert half.stats["train_no_think"] == len(half.no_think_ids) == 9  # round(18 training rows * 0.5)
    assert half.stats["val_fingerprint"] == zero.stats["val_fingerprint"]  # validation keeps thinking
    changed = [i for i, (a, b) in enumerate(zip(half.train_set.rows, zero.train_set.rows))
               if a["input_ids"] != b["input_ids"]]
    assert changed == half.no_think_ids


def test_preview_shows_a_non_thinking_row(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(12))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"model_name_or_path": str(tiny_dir), "cache_dir": str(tmp_path / "c")},
                                      "data": {"dataset": str(data), "max_length": 256, "no_think_share": 0.3}}),
                      encoding="utf-8")
    preview.main(["--config", str(config), "--color", "never"])
    out = capsys.readouterr().out
    assert "== a non-thinking training row (data.no_think_share=0.3: 3 of 10 rows;" in out
    shown = out.split("== a non-thinking training row")[1]
    assert "/no_think<|im_end|>" in shown and "[train]<think>\n\n</think>\n\nRest Rest Rest" in shown


def test_eval_prompts_for_each_thinking_mode(tokenizer):
    """``medsft eval``'s prompts: thinking on opens the assistant turn; ``enable_thinking=False`` pre-fills the empty
    think block (as the loglik scorer's prompt does); ``/no_think`` ends the user turn of a thinking prompt."""
    from medsft_lightning.data.benchmarks import MCQ_SAMPLE, load_benchmark
    from medsft_lightning.data.mcq_prompt import render

    question = load_benchmark(MCQ_SAMPLE).questions[:1]
    think, flag, switch = (render(tokenizer, question, "generate", SYSTEM, mode)[0]
                           for mode in ("think", "no_think_flag", "no_think_switch"))
    (loglik,) = render(tokenizer, question, "loglik", SYSTEM)
    assert think.endswith("答案：B”。<|im_end|>\n<|im_start|>assistant\n")
    assert flag == think + "<think>\n\n</think>\n\n"
    assert loglik.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert switch == think.replace("<|im_end|>\n<|im_start|>assistant", " /no_think<|im_end|>\n<|im_start|>assistant")
