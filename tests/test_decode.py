"""The decoding loop: greedy output identical to ``model.generate``, finished rows leave the batch."""

import pytest
import torch

from medsft_lightning.decode import LastTokenHead, decode, pick_tokens
from medsft_lightning.generate import left_pad


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_greedy(model, ids, mask, n, stops, pad_id):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             eos_token_id=stops, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    rows = []
    for tokens in out[:, ids.shape[1] :].tolist():
        end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        rows.append(tokens[:end])
    return rows


def test_greedy_equals_generate_with_left_padding_and_early_stops(model, tokenizer):
    prompts = [tokenizer(text)["input_ids"] for text in
               ("Fever for two days", "A child has a rash and a cough since last night, what now?", "Headache")]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    never = [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    full = decode(model, ids, mask, 12, never)
    assert full == hf_greedy(model, ids, mask, 12, never, tokenizer.pad_token_id)
    assert [len(r) for r in full] == [12, 12, 12]
    # Make the token row 0 emits 4th a stop token: row 0 leaves the batch early, the others go on.
    stops = [full[0][3]]
    early = decode(model, ids, mask, 12, stops)
    assert early == hf_greedy(model, ids, mask, 12, stops, tokenizer.pad_token_id)
    assert len(early[0]) == full[0].index(stops[0]) + 1 <= 4 and early[0][-1] == stops[0]
    assert any(len(r) == 12 for r in early)  # some row outlived row 0, decoding after the batch shrank


def test_pick_tokens_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]])).repeat(400, 1)
    assert pick_tokens(logits, False, 1.0, 0, 1.0).tolist() == [0] * 400
    torch.manual_seed(0)
    top_k = pick_tokens(logits, True, 1.0, 2, 1.0)
    assert set(top_k.tolist()) == {0, 1}
    torch.manual_seed(0)
    # top_p 0.6: token 1 is kept (0.5 before it < 0.6), token 2 is not (0.8 before it)
    top_p = pick_tokens(logits, True, 1.0, 0, 0.6)
    assert set(top_p.tolist()) == {0, 1}
    share = (top_p == 0).float().mean().item()
    assert share == pytest.approx(0.5 / 0.8, abs=0.07)  # renormalised over the kept tokens
    torch.manual_seed(0)
    assert set(pick_tokens(logits, True, 1.0, 0, 1.0).tolist()) == {0, 1, 2}


def test_last_token_head_matches_linear_and_reuses_one_buffer():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=True)
    fast = LastTokenHead(head, rows=8)
    for rows in (8, 5, 1):  # finished rows leave the batch: fewer rows, same buffer
        hidden = torch.randn(rows, 16)
        logits = fast(hidden)
        assert logits.shape == (rows, 1000)
        torch.testing.assert_close(logits, head(hidden), rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), head(hidden).argmax(-1))
    no_bias = torch.nn.Linear(16, 1000, bias=False)
    fast = LastTokenHead(no_bias, rows=3)
    out = fast(torch.ones(3, 16))
    assert out.untyped_storage().data_ptr() == fast.buffer.untyped_storage().data_ptr()  # written in place
    torch.testing.assert_close(out, no_bias(torch.ones(3, 16)), rtol=1e-5, atol=1e-5)


def test_misaligned_weights_are_realigned_and_stay_tied(tiny_dir):
    from transformers import AutoModelForCausalLM

    from medsft_lightning.module import own_aligned_memory

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    # What from_pretrained gives today (views of the mmapped file at 8-byte offsets), made certain whatever
    # transformers' loader does: the tied head and one layer weight moved to an 8-byte offset.
    for param in (model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight):
        storage = torch.empty(param.numel() + 16)
        offset = next(i for i in range(1, 16) if (storage.data_ptr() + 4 * i) % 64 == 8)
        param.data = storage[offset : offset + param.numel()].view_as(param).copy_(param.data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert model.lm_head.weight.data_ptr() % 64 == 8 and model.model.embed_tokens.weight.data_ptr() % 64 == 8
    own_aligned_memory(model)
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tied tensor
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
