"""Choosing a source's data files, reading and checking their rows, splitting and fingerprinting them.

Rows are read line by line by us (not by pyarrow) so that every problem can be reported as
``file:line: field: what is wrong``. Lines end at ``\n``, ``\r\n`` or a lone ``\r`` (a JSON string cannot
hold a raw CR or LF, so no ending can land inside a field) and at nothing else: ``str.splitlines`` would
also cut at U+2028, U+0085 and friends, which JSON strings may hold raw. Harmless oddities are notices,
not problems: a UTF-8 byte-order mark (ignored) and a file mixing line-ending styles (counted).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("question", "think", "answer")
MAX_LISTED_PROBLEMS = 20
BOM = "\ufeff"
_EOL = re.compile(rb"\r\n|\r|\n")
_EOL_NAMES = {b"\r\n": "CRLF", b"\n": "LF", b"\r": "CR"}
DATA_SUFFIXES = (".jsonl", ".json")
MAX_LISTED_FILES = 20
# JSON files that hub repositories and `datasets` keep beside the rows; never rows, skipped by default:
HUB_METADATA_FILES = (
    "configuration.json",  # every ModelScope repo: framework and task
    "dataset_infos.json",  # ModelScope/Hugging Face dataset card: features and split sizes per config
    "dataset_info.json",  # datasets.save_to_disk and the Arrow cache: features, splits, checksums
    "dataset_dict.json",  # datasets.DatasetDict.save_to_disk: the split names
    "state.json",  # datasets.save_to_disk: the Arrow shards and fingerprint
    "croissant.json",  # Croissant (ML Commons) dataset metadata, as exported by HF and Kaggle
)


class DataError(ValueError):
    """Source rows that cannot be trained on; the message lists every problem found."""


@dataclass
class Rows:
    """Rows with where each came from (``file:line``), the problems and notices found while reading.

    ``counts`` holds the checks' tallies (``boms_ignored``, ``mixed_line_ending_files``, and those of
    :mod:`medsft_lightning.data.checks`); ``notices`` the findings that are not problems, as
    ``(kind, "file:line: what")`` with ``kind`` one of those tallies.
    """

    rows: list[dict] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    notices: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    file_rows: dict[Path, int] = field(default_factory=dict)  # good rows read from each file

    def keep_only(self, keep: Sequence[bool]) -> None:
        """Drop, in place, the rows whose ``keep`` flag is false."""
        self.rows = [r for r, k in zip(self.rows, keep) if k]
        self.where = [w for w, k in zip(self.where, keep) if k]

    def raise_if_problems(self, what: str) -> None:
        if not self.problems:
            return
        shown = "\n  ".join(self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  … and {more} more" if more > 0 else ""
        raise DataError(
            f"{len(self.problems)} problem(s) in {what}:\n  {shown}{tail}\n"
            "Fix the rows, or set data.on_bad_rows=skip to skip and count them."
        )


@dataclass
class DataFiles:
    """One source's files: ``files`` are read as rows, ``metadata`` (hub metadata) passed over."""

    root: Path
    files: list[Path]
    metadata: list[Path] = field(default_factory=list)

    def summary(self, rows: Rows) -> str:
        """``read a.jsonl (2,407 rows); skipped as hub metadata: configuration.json`` (names relative to ``root``)."""
        read = ", ".join(f"{f.relative_to(self.root).as_posix()} ({rows.file_rows.get(f, 0):,} rows)"
                         for f in self.files)
        skipped = ", ".join(f.relative_to(self.root).as_posix() for f in self.metadata)
        return f"read {read}" + (f"; skipped as hub metadata: {skipped}" if skipped else "")


def _hidden(file: Path, root: Path) -> bool:
    """Under a hidden file or folder of ``root`` (ModelScope's ``.mdl``/``.msc``/``.mv``, ``._____temp/``, ``.git``)."""
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _listing(files: Sequence[Path], root: Path) -> str:
    names = [f.relative_to(root).as_posix() for f in files[:MAX_LISTED_FILES]]
    more = f", … and {len(files) - MAX_LISTED_FILES} more" if len(files) > MAX_LISTED_FILES else ""
    return ", ".join(names) + more if names else "no visible file"


def select_data_files(path: Path, patterns: Sequence[str] | None = None) -> DataFiles:
    """The files of a dataset file or folder to read as rows (``data.data_files``).

    A file is read as given. In a folder, ``patterns`` are globs relative to it (``**`` recurses); ``None``
    takes every ``.jsonl`` and ``.json`` file at any depth except hub metadata (``HUB_METADATA_FILES``).
    Files under hidden files or folders (hub cache state, partial downloads) are never read.
    """
    if path.is_file():
        return DataFiles(path.parent, [path])
    visible = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    if patterns is None:
        data = [p for p in visible if p.suffix in DATA_SUFFIXES]
        files = [p for p in data if p.name not in HUB_METADATA_FILES]
        metadata = [p for p in data if p.name in HUB_METADATA_FILES]
        if not files:
            besides = f" besides hub metadata ({_listing(metadata, path)})" if metadata else ""
            raise FileNotFoundError(
                f"{path}: folder holds no .jsonl or .json data file{besides}; it holds: {_listing(visible, path)}. "
                "Set data.data_files to the files to read (glob patterns relative to the folder, e.g. "
                "['train/*.jsonl'])."
            )
        return DataFiles(path, files, metadata)
    chosen: set[Path] = set()
    for pattern in patterns:
        if not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise DataError(f"data.data_files: {pattern!r} is not a glob pattern relative to the folder {path}")
        matched = [p for p in path.glob(pattern) if p.is_file() and not _hidden(p, path)]
        if not matched:
            raise FileNotFoundError(
                f"data.data_files: {pattern!r} matches no file in {path} (it holds: {_listing(visible, path)})")
        chosen.update(matched)
    if wrong := sorted(p for p in chosen if p.suffix not in DATA_SUFFIXES):
        raise DataError(f"data.data_files={list(patterns)!r}: {_listing(wrong, path)} in {path}: "
                         "not a .jsonl or .json file")
    return DataFiles(path, sorted(chosen))


def _check_row(obj: object) -> list[str]:
    if not isinstance(obj, dict):
        return [f"row: expected a JSON object, got {type(obj).__name__}"]
    problems = []
    for name in REQUIRED_FIELDS:
        if name not in obj:
            problems.append(f"{name}: missing")
        elif not isinstance(obj[name], str):
            problems.append(f"{name}: expected a string, got {type(obj[name]).__name__}")
        elif name != "think" and not obj[name].strip():
            problems.append(f"{name}: empty")
    return problems


def _lines(raw: bytes) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, line bytes)`` of every line, split at CRLF, LF or a lone CR."""
    number, start = 1, 0
    for match in _EOL.finditer(raw):
        yield number, start, raw[start : match.start()]
        number, start = number + 1, match.end()
    yield number, start, raw[start:]


def _not_utf8(err: UnicodeDecodeError, offset: int) -> str:
    bad = err.object[err.start : err.start + 1].hex()
    return (f"encoding: not UTF-8 ({err.reason}: byte 0x{bad} at byte offset {offset + err.start} of the file); "
            "save the file as UTF-8")


def _note_line_endings(file: Path, raw: bytes, notices: list[tuple[str, str]]) -> None:
    endings = Counter(_EOL.findall(raw))
    if len(endings) > 1:
        styles = ", ".join(f"{n} {_EOL_NAMES[e]}" for e, n in sorted(endings.items(), key=lambda kv: -kv[1]))
        notices.append(("mixed_line_ending_files", f"{file}: mixed line endings ({styles}); every row read as usual"))


def read_records(file: Path, notices: list[tuple[str, str]] | None = None) -> list[tuple[int, object | str]]:
    """``(line, parsed object)`` per record, or ``(line, "what is wrong")`` strings for bad lines.

    A ``.json`` file holding an array gives line 0 for each element. ``notices`` (when given) receives
    ``(kind, "file:line: what")`` for a byte-order mark (``boms_ignored``) and mixed line endings
    (``mixed_line_ending_files``).
    """
    raw = file.read_bytes()
    notices = [] if notices is None else notices
    _note_line_endings(file, raw, notices)
    if file.suffix == ".json" and raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _read_array(file, raw, notices)
    records: list[tuple[int, object | str]] = []
    for number, offset, line in _lines(raw):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            records.append((number, _not_utf8(err, offset)))
            continue
        if text.startswith(BOM):  # at the start of the file, or where files with one were concatenated
            notices.append(("boms_ignored", f"{file}:{number}: UTF-8 byte-order mark (BOM) ignored"))
            text = text[1:]
        if not text.strip():
            continue
        try:
            records.append((number, json.loads(text)))
        except json.JSONDecodeError as err:
            records.append((number, f"invalid JSON: {err.msg} (column {err.colno})"))
    return records


def _read_array(file: Path, raw: bytes, notices: list[tuple[str, str]]) -> list[tuple[int, object | str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return [(len(_EOL.findall(raw[: err.start])) + 1, _not_utf8(err, 0))]
    if text.startswith(BOM):
        notices.append(("boms_ignored", f"{file}:1: UTF-8 byte-order mark (BOM) ignored"))
        text = text[1:]
    try:
        return [(0, obj) for obj in json.loads(text)]
    except json.JSONDecodeError as err:
        return [(err.lineno, f"invalid JSON: {err.msg} (column {err.colno})")]


def read_rows(files: Sequence[Path], skip_bad: bool = False) -> Rows:
    """Read and check every row of ``files``; bad rows become problems (or counted skips)."""
    out = Rows()
    for file in files:
        notices: list[tuple[str, str]] = []
        records = read_records(file, notices)
        out.counts.update(kind for kind, _ in notices)
        out.notices.extend(notices)
        out.file_rows[file] = 0
        for index, (number, obj) in enumerate(records):
            where = f"{file}:{number}" if number else f"{file}[{index}]"
            problems = [obj] if isinstance(obj, str) else _check_row(obj)
            if problems:
                if skip_bad:
                    out.skipped += 1
                else:
                    out.problems.extend(f"{where}: {p}" for p in problems)
                continue
            out.rows.append({name: obj[name] for name in REQUIRED_FIELDS})
            out.where.append(where)
            out.file_rows[file] += 1
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The seed tutorial's split, as ``(train, val)`` row indices in file order.

    The tutorial (Qwen3-Medical-SFT) does ``random.seed(42); random.shuffle(rows); cut = int(len(rows) * 0.9)``
    and trains on ``rows[:cut]``, validating on ``rows[cut:]``. A shuffle's permutation depends only on the
    seed and the number of rows, so shuffling the indices gives the same rows on each side, for any ``n``:

    >>> import random
    >>> rows = list("abcdefghijklm")
    >>> random.seed(42); random.shuffle(rows); cut = int(len(rows) * 0.9)
    >>> train, val = split_indices(13, 0.1, 42)
    >>> sorted(rows[cut:]) == ["abcdefghijklm"[i] for i in val]
    True
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = int(n * (1 - val_fraction))
    if cut < 1 or cut >= n:
        raise DataError(f"cannot split {n} row(s) with val_fraction={val_fraction}: the seed's rule "
                        f"(int({n} × {1 - val_fraction:g}) = {cut} training rows) leaves "
                        f"{'nothing to train on' if cut < 1 else 'no validation row'}; add rows or set "
                        "data.val_dataset")
    return sorted(order[:cut]), sorted(order[cut:])


def fingerprint(rows: Sequence[dict]) -> str:
    """A short content hash of rows (order-sensitive), for logs and cache keys."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:12]
