"""What wrote a ``medsft predict`` answers file: the record beside it (``<answers>.meta.json``) that decides whether a
rerun may resume the file.

A rerun appends to an answers file only when the same model, the same decoding settings and the same questions
wrote it; the record holds the three, and :func:`differences` names what changed:

- ``model``: where it came from (``source``: a local path made absolute, else the hub id; ``revision``), a content
  fingerprint of its folder's config and weights (``weights``), the ``--ckpt_path`` checkpoint and its fingerprint,
  the LoRA settings and the dtype the weights decode in;
- ``decoding``: the engine (``hf``/``vllm``: their sampling draws differ), the generation settings resolved against
  the model's ``generation_config.json`` (an explicit ``temperature 0.6`` and a ``null`` that resolves to 0.6 are the
  same run) and the default system prompt;
- ``questions``: each question's id and a digest of its prompt token ids, which covers the question's text, its
  system prompt, the chat template and the tokenizer.

Fingerprints are cheap for any model (:func:`file_fingerprint`: a few MiB read, also for a 3.4 GB shard) and see
what training changes: a safetensors file is sampled in every tensor (LoRA merged into one projection of every
layer changes those tensors throughout), a ``torch.save`` zip (``.ckpt``) by the CRC-32 of every member. An edit
confined to a few bytes between the sampled blocks of a tensor would go unseen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

FORMAT = 1
BLOCK, SAMPLE_BLOCKS = 64 * 1024, 64  # a file of another kind: 64 evenly spaced 64 KiB blocks
TENSOR_BLOCK = 4096  # a safetensors file: three blocks of every tensor
WHOLE_FILE = SAMPLE_BLOCKS * BLOCK  # smaller files are hashed whole
# What a model folder's (or a sharded checkpoint folder's) fingerprint covers: config and weights. The tokenizer is
# covered by the prompts' digests; anything else in the folder (a README, an answers file put there) is not read.
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "*.index.json", "*.safetensors",
               "*.bin", "*.pt", "*.pth", "*.ckpt", "*.distcp", ".metadata")


def record_path(answers: str | os.PathLike) -> Path:
    """The record beside an answers file: ``answers.jsonl`` -> ``answers.jsonl.meta.json``."""
    path = Path(answers)
    return path.with_name(path.name + ".meta.json")


def file_fingerprint(path: str | os.PathLike) -> str:
    """A content digest of one model or checkpoint file that reads a few MiB at most, whatever its size.

    A file up to :data:`WHOLE_FILE` bytes is hashed whole. Beyond that: a safetensors file by its header (every
    tensor's name, dtype, shape and offsets) and three :data:`TENSOR_BLOCK` blocks of every tensor's data (start,
    middle, end); a zip file (``torch.save``: ``.ckpt``, ``pytorch_model.bin``) by its members' names, sizes and
    CRC-32s, which ``torch.save`` computes over every member's whole content; anything else by
    :data:`SAMPLE_BLOCKS` evenly spaced blocks of :data:`BLOCK` bytes. Nothing is unpickled or loaded.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with path.open("rb") as f:
        if size <= WHOLE_FILE:
            digest.update(f.read())
        elif not (path.suffix == ".safetensors" and _safetensors_samples(f, size, digest)) and not (
                zipfile.is_zipfile(f) and _zip_entries(f, digest)):
            _spread_samples(f, size, digest)
    return digest.hexdigest()[:16]


def _read_at(f, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _spread_samples(f, size: int, digest) -> None:
    for i in range(SAMPLE_BLOCKS):
        digest.update(_read_at(f, (size - BLOCK) * i // (SAMPLE_BLOCKS - 1), BLOCK))


def _safetensors_samples(f, size: int, digest) -> bool:
    """Hash the header and a start, middle and end block of every tensor; ``False`` if it is no safetensors file."""
    (length,) = struct.unpack("<Q", _read_at(f, 0, 8))
    if not 2 <= length <= min(size - 8, 100 << 20):
        return False
    raw = f.read(length)
    try:
        offsets = sorted(v["data_offsets"] for k, v in json.loads(raw).items() if k != "__metadata__")
    except (ValueError, AttributeError, KeyError, TypeError):
        return False
    digest.update(raw)
    for begin, end in offsets:
        begin, end = 8 + length + begin, 8 + length + end
        for at in sorted({max(begin, at) for at in (begin, (begin + end - TENSOR_BLOCK) // 2, end - TENSOR_BLOCK)}):
            digest.update(_read_at(f, at, min(TENSOR_BLOCK, end - begin)))
    return True


def _zip_entries(f, digest) -> bool:
    """Hash every member's name, size and CRC-32 (its whole content), read from the zip's central directory."""
    f.seek(0)
    try:
        members = zipfile.ZipFile(f).infolist()
    except zipfile.BadZipFile:
        return False
    for m in members:
        digest.update(f"{m.filename}\t{m.file_size}\t{m.CRC}\n".encode())
    return all(m.CRC or not m.file_size for m in members)  # CRCs left out: sample the bytes as well


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A file's :func:`file_fingerprint`, or a folder's: the names and fingerprints of its :data:`MODEL_FILES`."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    files = sorted({f for pattern in MODEL_FILES for f in path.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\t{file_fingerprint(f)}\n".encode())
    return digest.hexdigest()[:16]


def prompt_digest(prompt_ids: Sequence[int]) -> str:
    """A digest of one question's prompt token ids."""
    return hashlib.sha256(json.dumps([int(t) for t in prompt_ids]).encode()).hexdigest()[:16]


def local_or_id(name: str | None) -> str | None:
    """A model or checkpoint name as the record keeps it: an existing local path made absolute, else as given."""
    if not name:
        return None
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def make_record(model: Mapping, decoding: Mapping, questions: Iterable[tuple[object, Sequence[int]]]) -> dict:
    """The record of a run: ``model`` and ``decoding`` as given (plain JSON values), ``questions`` as ``(id,
    prompt_ids)`` pairs."""
    decoding = dataclasses.asdict(decoding) if dataclasses.is_dataclass(decoding) else dict(decoding)
    return {"medsft_answers_record": FORMAT, "model": dict(model), "decoding": decoding,
            "questions": [[qid, prompt_digest(ids)] for qid, ids in questions]}


def read_record(path: str | os.PathLike) -> dict | None:
    """The record at ``path``; ``None`` if there is none. A file that is not a record raises ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable record ({err})") from None
    if not isinstance(record, dict) or record.get("medsft_answers_record") != FORMAT:
        raise ValueError(f"{path} is not a medsft answers record (format {FORMAT})")
    return record


def write_record(path: str | os.PathLike, record: Mapping) -> None:
    """Write ``record`` atomically: a temporary file, synced, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key(qid) -> str:
    return json.dumps(qid)  # 1 and "1" are different ids


def _short(value) -> str:
    """A value for the one-line message: JSON, its middle left out past 100 characters (a path keeps its end)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 100 else text[:40] + "..." + text[-57:]


def differences(old: Mapping, new: Mapping, answered: Iterable) -> list[str]:
    """What differs between the record that wrote the answers ``answered`` (their ids) and this run's, one phrase
    each: ``model.weights "1f…" then, "9c…" now``; questions by id, a few named."""
    found = []
    for section in ("model", "decoding"):
        before, now = old.get(section) or {}, new.get(section) or {}
        for name in [*now, *(n for n in before if n not in now)]:
            if before.get(name) != now.get(name):
                found.append(f"{section}.{name} {_short(before.get(name))} then, {_short(now.get(name))} now")
    then = {_key(q): d for q, d in old.get("questions") or []}
    now_q = {_key(q): d for q, d in new.get("questions") or []}
    gone = [q for q in answered if _key(q) not in now_q]
    changed = [q for q in answered if _key(q) in now_q and then.get(_key(q)) != now_q[_key(q)]]
    for ids, what in ((changed, "with another prompt now (question text, system prompt or chat template)"),
                      (gone, "not among the questions now")):
        if ids:
            named = ", ".join(_short(q) for q in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            found.append(f"{len(ids)} answered question(s) {what}: {named}")
    return found
