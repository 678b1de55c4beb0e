"""``medsft doctor MODEL_DIR``: check an exported model folder before anyone serves it (vLLM, transformers).

What exports that vLLM misreads have in common, checked one by one, each ``ok`` or ``FAIL`` with the reason:
``architectures`` in ``config.json``; a tied LM head that really is tied (no stray ``lm_head.weight`` that
differs from the embeddings) and an untied one that exists; the end-of-turn ids (``<|im_end|>``,
``<|endoftext|>``) in ``generation_config.json``; the chat template where transformers and vLLM read it (the
tokenizer's ``chat_template``: ``chat_template.jinja`` or ``tokenizer_config.json``); ``<think>`` and
``</think>`` single tokens; ``dtype`` and ``torch_dtype`` both naming the weights' dtype; a ``head_dim`` that
vLLM's CPU and GPU attention kernels take. Then both ``enable_thinking`` prompts are rendered and one short
greedy generation runs. Exit code 1 when a check fails. ``medsft fit`` runs it on its own export.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
THINK_TOKENS = ("<think>", "</think>")
# vLLM 0.32's attention: CPU (cpu_attn.py) takes these head sizes; FlashAttention multiples of 8 up to 256.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Export:
    """The files of an exported folder, read once: config, generation config, tokenizer, weight tensors."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.folder = folder
        self.config = _json(folder / "config.json")
        self.generation = _json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() \
            else {}
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.files = {name: file for file in sorted(folder.glob("*.safetensors")) for name in _keys(file)}

    def tensor(self, suffix: str):
        """The tensor whose name ends with ``suffix`` (read from its file alone), or ``None``."""
        from safetensors import safe_open

        name = next((n for n in self.files if n.endswith(suffix)), None)
        if name is None:
            return None
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def float_dtypes(self) -> set[str]:
        """The dtypes of the floating-point weights, as torch names them (``bfloat16``), read from the headers."""
        from safetensors import safe_open

        names = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        out = set()
        for file in set(self.files.values()):
            with safe_open(file, framework="pt") as f:
                out |= {names[d] for d in (f.get_slice(k).get_dtype() for k in f.keys()) if d in names}
        return out


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return json.loads(path.read_text(encoding="utf-8"))


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return list(f.keys())


def check_architectures(e: Export) -> Check:
    arch = e.config.get("architectures") or []
    return Check("architectures", bool(arch), ", ".join(arch) or "config.json names no architectures: vLLM cannot "
                 "pick a model class")


def check_tied_head(e: Export) -> Check:
    tied = e.config.get("tie_word_embeddings", True)
    head, embed = e.tensor("lm_head.weight"), e.tensor("embed_tokens.weight")
    if embed is None:
        return Check("tied embeddings", False, "no embed_tokens.weight in the safetensors files")
    if tied:
        if head is not None and not (head.shape == embed.shape and head.equal(embed)):
            return Check("tied embeddings", False, "tie_word_embeddings is true but lm_head.weight differs from the "
                         "embeddings: vLLM ties them and serves other weights than transformers")
        return Check("tied embeddings", True, "tied; " + ("lm_head.weight equals the embeddings" if head is not None
                                                            else "no separate lm_head.weight"))
    if head is None:
        return Check("tied embeddings", False, "tie_word_embeddings is false but there is no lm_head.weight")
    return Check("tied embeddings", True, "untied; lm_head.weight present")


def check_eos(e: Export) -> Check:
    ids = e.generation.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    want = {t: e.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
    missing = [t for t, i in want.items() if i not in ids]
    return Check("eos ids", not missing, f"generation_config.json eos_token_id {ids}" + (
        f" lacks {missing}: answers would not stop at the end of the turn" if missing else ""))


def check_chat_template(e: Export) -> Check:
    where = [name for name, ok in (("chat_template.jinja", (e.folder / "chat_template.jinja").is_file()),
                                   ("tokenizer_config.json", "chat_template" in _json_or_empty(
                                       e.folder / "tokenizer_config.json"))) if ok]
    ok = bool(where) and bool(e.tokenizer.chat_template)
    return Check("chat template", ok, f"in {', '.join(where)}" if ok else "no chat template in chat_template.jinja "
                 "or tokenizer_config.json: transformers and vLLM would refuse chat requests")


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check_think_tokens(e: Export) -> Check:
    ids = {t: e.tokenizer.encode(t, add_special_tokens=False) for t in THINK_TOKENS}
    bad = [t for t, i in ids.items() if len(i) != 1]
    return Check("think tokens", not bad, ", ".join(f"{t} = {i[0] if len(i) == 1 else i}" for t, i in ids.items())
                 + (f"; {bad} not one token: the reasoning parser cannot find them" if bad else ""))


def check_dtype(e: Export) -> Check:
    floats = sorted(e.float_dtypes())
    named = {key: e.config.get(key) for key in ("dtype", "torch_dtype")}
    ok = len(floats) == 1 and all(v == floats[0] for v in named.values())
    return Check("dtype", ok, f"weights {'/'.join(floats)}; config " + ", ".join(f"{k}={v}" for k, v in named.items())
                 + ("" if ok else ": both keys must name the weights' dtype, or vLLM casts (fp32 → fp16)"))


def check_head_dim(e: Export) -> Check:
    head_dim = e.config.get("head_dim") or e.config["hidden_size"] // e.config["num_attention_heads"]
    ok = head_dim in VLLM_CPU_HEAD_DIMS and head_dim % 8 == 0 and head_dim <= 256
    return Check("head_dim", ok, f"{head_dim}" + ("" if ok else f": vLLM's attention takes {VLLM_CPU_HEAD_DIMS} "
                                                    "on CPU (multiples of 8 up to 256 on GPU)"))


def check_prompts(e: Export) -> Check:
    messages = [{"role": "user", "content": "发烧了怎么办？"}]
    on = e.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = e.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                          enable_thinking=False)
    ok = on.endswith("<|im_start|>assistant\n") and off.endswith("<think>\n\n</think>\n\n")
    detail = ("thinking on ends with the open assistant turn, off with an empty think block" if ok
              else f"unexpected renderings: on ends {on[-40:]!r}, off ends {off[-40:]!r}")
    return Check("enable_thinking prompts", ok, detail)


def check_generation(e: Export) -> Check:
    import torch
    from transformers import AutoModelForCausalLM

    from medsft_lightning.data.encoding import build_prompts
    from medsft_lightning.generation.generate import Generation, generate_batch

    model = AutoModelForCausalLM.from_pretrained(e.folder, dtype=torch.float32).eval()
    prompts = build_prompts([{"question": "发烧了怎么办？"}], e.tokenizer, None)
    with torch.inference_mode():
        out = generate_batch(model, e.tokenizer, prompts, Generation(max_new_tokens=8, do_sample=False))[0]
    return Check("generation", out["num_generated_tokens"] > 0, f"{out['num_generated_tokens']} greedy tokens "
                 f"({out['finish_reason']})")


CHECKS: list[Callable[[Export], Check]] = [check_architectures, check_tied_head, check_eos, check_chat_template,
                                           check_think_tokens, check_dtype, check_head_dim, check_prompts,
                                           check_generation]


def diagnose(folder: str | Path, generate: bool = True) -> list[Check]:
    """Every check on ``folder``; a check that raises counts as failed, with its error as the reason."""
    try:
        export = Export(Path(folder))
    except Exception as err:  # not a model folder at all
        return [Check("files", False, f"{type(err).__name__}: {err}")]
    results = []
    for check in CHECKS if generate else CHECKS[:-1]:
        try:
            results.append(check(export))
        except Exception as err:
            results.append(Check(check.__name__.removeprefix("check_"), False, f"{type(err).__name__}: {err}"))
    return results


def report(folder: str | Path, results: list[Check]) -> str:
    lines = [f"medsft doctor {folder}"] + [f"  {'ok  ' if r.ok else 'FAIL'}  {r.name}: {r.detail}" for r in results]
    failed = [r.name for r in results if not r.ok]
    lines.append(f"{len(results) - len(failed)} of {len(results)} checks passed" + (
        f"; failed: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def check_fit_export(export: str | Path) -> None:
    """The file checks on ``medsft fit``'s own export, logged (the run's samples already showed it generates)."""
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    results = diagnose(export, generate=False)
    for check in results:
        if not check.ok:
            rank_zero_warn(f"[doctor] {export}: {check.name}: {check.detail}")
    passed = sum(c.ok for c in results)
    rank_zero_info(f"[doctor] {export}: {passed} of {len(results)} checks passed (medsft doctor {export})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsft doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an exported folder, e.g. runs/demo/version_0/hf_model")
    parser.add_argument("--no_generate", action="store_true", help="skip the short generation (files only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``medsft doctor MODEL_DIR``: see the module docstring."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    results = diagnose(args.model_dir, generate=not args.no_generate)
    print(report(args.model_dir, results))  # the command's report, on stdout
    sys.exit(0 if all(r.ok for r in results) else 1)
