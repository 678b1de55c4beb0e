"""The decoding loop: greedy output identical to ``model.generate``, finished rows leave the batch; decoding
defaults from the model's generation config, seeded sampling, presence/repetition penalties."""

import pytest
import torch

from medsft_lightning.generation.decode import LastTokenHead, Penalties, decode, penalize, pick_tokens
from medsft_lightning.generation.generate import STOP_TOKENS, Generation, generate_batch, generation_mode, left_pad
from medsft_lightning.generation.metrics import GenerationMetrics
from medsft_lightning.generation.samples import SampleGenerations

PROMPTS = ("Fever for two days", "A child has a rash and a cough since last night, what now?", "Headache")


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
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
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

    from medsft_lightning.training.module import own_aligned_memory

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


def sampling(settings: Generation) -> tuple:
    return settings.do_sample, settings.temperature, settings.top_p, settings.top_k


def test_defaults_resolve_from_the_model_generation_config_else_qwen3(model):
    from transformers import GenerationConfig

    default = Generation()
    assert default.max_new_tokens == 2048 and sampling(default) == (None, None, None, None)
    assert SampleGenerations().generation == default == GenerationMetrics().generation
    qwen3 = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20, eos_token_id=[151645, 151643])
    assert sampling(default.resolved(qwen3)) == (True, 0.6, 0.95, 20)
    assert sampling(default.resolved(GenerationConfig(temperature=0.7))) == (True, 0.7, 0.95, 20)  # what it sets
    assert sampling(default.resolved(GenerationConfig(do_sample=False))) == (False, 0.6, 0.95, 20)
    # The tiny model's generation_config.json sets only eos/pad ids: transformers' defaults do not count.
    assert sampling(default.resolved(model.generation_config)) == (True, 0.6, 0.95, 20)
    assert sampling(default.resolved(None)) == (True, 0.6, 0.95, 20)
    explicit = Generation(do_sample=False, temperature=1.0, top_p=0.5, top_k=0)
    assert sampling(explicit.resolved(qwen3)) == (False, 1.0, 0.5, 0)  # an explicit value always wins
    assert default.resolved(qwen3).describe() == ("sampling (temperature 0.6, top_p 0.95, top_k 20, seed 0), "
                                                  "max_new_tokens 2048")
    with pytest.raises(ValueError, match="repetition_penalty=0"):
        Generation(repetition_penalty=0)


def test_default_sampling_repeats_with_its_seed_and_greedy_stays_available(model, tokenizer):
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]

    def answers(settings: Generation, seed: int) -> list[str]:
        with generation_mode(model, seed):
            return [o["raw"] for o in generate_batch(model, tokenizer, prompts, settings)]

    first, again, other = (answers(Generation(max_new_tokens=12, seed=s), s) for s in (0, 0, 1))
    assert first == again and first != other
    greedy = answers(Generation(max_new_tokens=12, do_sample=False), 0)
    assert greedy != first and greedy == answers(Generation(max_new_tokens=12, do_sample=False, seed=1), 1)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    expected = hf_greedy(model, ids, mask, 12, stops, tokenizer.pad_token_id)
    assert greedy == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]


def test_penalize_exact_on_a_hand_made_row():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    context, generated = torch.tensor([[0, 1, 3, 3]]), torch.tensor([[3, 3]])  # prompt 0, 1; generated 3, 3
    # repetition 2: 2 / 2 = 1, -1 * 2 = -2, 3 / 2 = 1.5; presence 0.5 once (token 3 was generated twice): 1.0
    out = penalize(logits.clone(), context, generated, presence_penalty=0.5, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0, -2.0, 1.0]]
    assert penalize(logits.clone(), context, generated, 0.0, 1.0).tolist() == logits.tolist()
    assert penalize(logits.clone(), context, generated, 0.5, 1.0).tolist() == [[2.0, -1.0, 0.5, 2.5, -2.0, 1.0]]
    # Per-row state: padding (id 4, mask 0) is no prompt token; rows leaving the batch take their state along.
    pen = Penalties(torch.tensor([[4, 4, 0, 1], [4, 5, 2, 2]]), torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]),
                    max_new_tokens=3, presence_penalty=0.5, repetition_penalty=2.0)
    two = logits.repeat(2, 1)
    assert pen(two.clone()).tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0, 1.0], [2.0, -1.0, 0.25, 3.0, -2.0, 0.5]]
    pen.record(torch.tensor([3, 0]))
    pen.keep(torch.tensor([1]))  # row 0 finished
    assert pen(logits.clone()).tolist() == [[0.5, -1.0, 0.25, 3.0, -2.0, 0.5]]  # row 1 generated 0: 2 / 2 - 0.5


def test_presence_penalty_stops_repeats_also_after_rows_leave_the_batch(model, tokenizer):
    ids, mask = left_pad([tokenizer(text)["input_ids"] for text in PROMPTS], tokenizer.pad_token_id, "cpu")
    plain = decode(model, ids, mask, 24, [-1])
    assert all(len(set(r)) < len(r) for r in plain)  # the random tiny model repeats itself greedily
    penalized = decode(model, ids, mask, 24, [-1], presence_penalty=1e4)
    assert all(len(set(r)) == len(r) == 24 for r in penalized)  # no token id twice within a row
    assert [r[0] for r in penalized] == [r[0] for r in plain]  # nothing generated yet: the first token is as before
    # Row 0 stops early and leaves the batch; the others keep their own penalty state and so their tokens.
    k = next(k for k in range(2, 24) if penalized[0][k] not in penalized[1] + penalized[2])
    early = decode(model, ids, mask, 24, [penalized[0][k]], presence_penalty=1e4)
    assert early == [penalized[0][: k + 1], *penalized[1:]]
