"""The offline tokenizer is the real Qwen3 vocabulary; the tiny model loads via from_pretrained."""

from medsft_lightning.hub.tiny import ADDED_TOKENS, FIRST_ADDED_ID, VOCAB_SIZE


def test_tokenizer_matches_qwen_ids(tokenizer):
    # Ids of the published Qwen2/Qwen3 tokenizer.
    assert tokenizer("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tokenizer("你好", add_special_tokens=False).input_ids == [108386]
    assert tokenizer("system\nuser\nassistant", add_special_tokens=False).input_ids == [8948, 198, 872, 198, 77091]
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == FIRST_ADDED_ID + offset
    assert tokenizer.convert_tokens_to_ids("<think>") == 151667
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # <think> is not special: decoding with skip_special_tokens keeps it, as in Qwen3.
    ids = tokenizer("<|im_start|>a<think>b</think><|im_end|>", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a<think>b</think>"


def test_tiny_model_loads_with_plain_transformers(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "qwen3" and cfg.vocab_size == VOCAB_SIZE
    assert cfg.tie_word_embeddings and cfg.head_dim == 64  # head_dim 64: what vLLM's attention kernels take
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == [151645, 151643]
    out = model(torch.tensor([[9707, 1879]]))
    assert out.logits.shape == (1, 2, VOCAB_SIZE)
