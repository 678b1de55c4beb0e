"""What counts as a secret (API keys, credential tokens, passwords), and masking them in what medsft prints.

Secrets reach medsft only through the environment (``SWANLAB_API_KEY``, ``MODELSCOPE_API_TOKEN``, ``HF_TOKEN``,
``OPENAI_API_KEY``, ``VLLM_API_KEY``, …) or a flag such as ``medsft serve … -- --api-key KEY``. A name is a
secret's by its kind, not by containing "token": ``hf_token``, ``api_token``, ``SWANLAB_API_KEY``, ``password``
are; ``max_new_tokens``, ``tokenizer``, ``tokenizer_revision``, ``pad_token``, ``train_supervised_tokens`` are not.

>>> [n for n in ("hf_token", "SWANLAB_API_KEY", "max_new_tokens", "tokenizer", "pad_token", "apiKey")
...  if is_secret_name(n)]
['hf_token', 'SWANLAB_API_KEY', 'apiKey']
>>> mask_argv(["--port", "8000", "--api-key", "sk-1", "--hf-token=hf_2"])
['--port', '8000', '--api-key', '***', '--hf-token=***']
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

MASK = "***"
# A word that makes any name a secret's.
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
                          "authorization", "apikey", "cookie", "bearer"})
# Two words in a row that do: api_key, access_key, AWS_SECRET_ACCESS_KEY, private_key, …
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "key"),
                          ("signing", "key"), ("auth", "token")})
# ``<word>_token`` names a vocabulary entry, not a credential, after these words (pad_token, eos_token, …).
VOCABULARY_TOKENS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "end", "start", "begin", "stop",
                               "think", "image", "video", "audio", "special", "additional", "chat", "split",
                               "first", "last", "next", "new", "max", "min", "num"})
SHORTEST_SECRET = 4  # values shorter than this ("", "1", "EMPTY"-like placeholders are longer) are not masked


def words(name: str) -> list[str]:
    """``"SWANLAB_API_KEY"`` → ``["swanlab", "api", "key"]``; ``"apiKey"`` → ``["api", "key"]``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    return [w for w in re.split(r"[^a-zA-Z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a setting, flag or environment variable called ``name`` holds a credential."""
    parts = words(name)
    if any(w in SECRET_WORDS for w in parts) or any(pair in SECRET_PAIRS for pair in zip(parts, parts[1:])):
        return True
    # ``token`` (singular, last): a credential unless a vocabulary word names which token it is.
    return bool(parts) and parts[-1] == "token" and (len(parts) == 1 or parts[-2] not in VOCABULARY_TOKENS)


def secret_env_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of every environment variable whose name is a secret's (``*_API_KEY``, ``*_TOKEN``, …)."""
    env = os.environ if env is None else env
    return [v for k, v in env.items() if is_secret_name(k) and len(v) >= SHORTEST_SECRET]


def argv_secrets(argv: Iterable[str]) -> list[str]:
    """The values given to secret flags in ``argv`` (``--api-key KEY``, ``--token=T``)."""
    argv, found = list(argv), []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if not flag.startswith("-") or not is_secret_name(flag):
            continue
        if eq:
            found.append(value)
        else:  # the values up to the next flag (vLLM's --api-key takes one or more)
            for nxt in argv[i + 1:]:
                if nxt.startswith("-"):
                    break
                found.append(nxt)
    return [v for v in found if len(v) >= SHORTEST_SECRET]


def mask_argv(argv: Iterable[str]) -> list[str]:
    """``argv`` with every secret flag's value replaced by ``***``, to print or log."""
    out, masking = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        is_flag = arg.startswith("-")
        if is_flag:
            masking = is_secret_name(flag) and not eq
            out.append(f"{flag}={MASK}" if eq and is_secret_name(flag) else arg)
        else:
            out.append(MASK if masking else arg)
    return out


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***`` (longest first)."""
    for secret in sorted({s for s in secrets if len(s) >= SHORTEST_SECRET}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
