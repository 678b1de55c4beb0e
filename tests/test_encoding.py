"""encode_example: the chat template's rendering, exact ids and labels, truncation and drops."""

import pytest

from medsft_lightning.data.datamodule import encode_example
from medsft_lightning.data.encoding import TemplateError, encode_rows
from medsft_lightning.data.formatting import row_to_messages, split_think_answer

ROW = {"question": "Q?", "think": "T", "answer": "A.", "instruction": "", "metrics": {}}
# Hand-checked against the published Qwen3 tokenizer and template.
IDS = [151644, 8948, 198, 50, 151645, 198,  # <|im_start|>system\nS<|im_end|>\n
       151644, 872, 198, 48, 30, 151645, 198,  # <|im_start|>user\nQ?<|im_end|>\n
       151644, 77091, 198,  # <|im_start|>assistant\n
       151667, 198, 51, 198, 151668, 271, 32, 13, 151645,  # <think>\nT\n</think>\n\nA.<|im_end|>
       198]  # trailing \n
M = -100


def published_rendering(system: str, question: str, think: str, answer: str) -> str:
    """What the published Qwen3 chat template renders for one training conversation."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n<think>\n{think.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}<|im_end|>\n")


def test_row_to_messages_is_pure_and_ignores_other_columns():
    assert row_to_messages(ROW, system_prompt="S") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A.", "reasoning_content": "T"},
    ]
    assert row_to_messages(ROW, system_prompt="")[0] == {"role": "user", "content": "Q?"}


@pytest.mark.parametrize("think,answer", [("T", "A."), ("\n多步推理\n\n", "\n先休息。\n补液"), ("", "Only answer")])
def test_template_rendering_is_byte_identical_to_published_qwen3(tokenizer, think, answer):
    row = {"question": "头痛怎么办？", "think": think, "answer": answer}
    text = tokenizer.apply_chat_template(row_to_messages(row, "S"), tokenize=False)
    assert text == published_rendering("S", row["question"], think, answer)
    enc = encode_example(row, tokenizer, system_prompt="S", max_length=4096)
    assert enc["input_ids"] == tokenizer(text, add_special_tokens=False).input_ids


def test_exact_ids_and_labels(tokenizer):
    enc = encode_example(ROW, tokenizer, system_prompt="S", max_length=100)
    assert enc["input_ids"] == IDS
    assert enc["attention_mask"] == [1] * len(IDS)
    assert enc["labels"] == [M] * 16 + IDS[16:25] + [M]
    assert set(enc) == {"input_ids", "attention_mask", "labels"}


def test_truncation_keeps_the_prompt_and_cuts_the_answer(tokenizer):
    enc = encode_example(ROW, tokenizer, system_prompt="S", max_length=20)
    assert enc["input_ids"] == IDS[:20]
    assert enc["labels"] == [M] * 16 + IDS[16:20]
    (full,) = encode_rows([ROW], tokenizer, system_prompt="S", max_length=20)
    assert full["num_supervised"] == 4 and full["truncated"] is True


def test_returns_none_when_nothing_supervised_survives(tokenizer):
    assert encode_example(ROW, tokenizer, system_prompt="S", max_length=16) is None
    assert encode_example(ROW, tokenizer, system_prompt="S", max_length=17)["labels"] == [M] * 16 + [151667]


def test_non_prefix_template_is_refused(tokenizer):
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # A template that renders the generation prompt differently from the training turn.
    other.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                           "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(TemplateError, match="prefix"):
        encode_example(ROW, other, system_prompt="S", max_length=100)


def test_split_think_answer():
    assert split_think_answer("<think>\nfever\n</think>\n\nRest.") == ("fever", "Rest.", True)
    assert split_think_answer("fever\n</think>\n\nRest.") == ("fever", "Rest.", True)
    assert split_think_answer("<think>\nloops forever") == ("", "<think>\nloops forever", False)
    assert split_think_answer("<think>x</think>") == ("x", "", False)
