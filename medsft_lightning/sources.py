"""Reading and checking source rows from .jsonl/.json files, splitting and fingerprinting them.

Rows are read line by line by us (not by pyarrow) so that every problem can be reported as
``file:line: field: what is wrong``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("question", "think", "answer")
MAX_LISTED_PROBLEMS = 20


class DataError(ValueError):
    """Source rows that cannot be trained on; the message lists every problem found."""


@dataclass
class Rows:
    """Rows with where each came from (``file:line``) and the problems found while reading."""

    rows: list[dict] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0

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


def data_files(path: Path) -> list[Path]:
    """The .jsonl/.json files of a file or folder (recursively, sorted)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in {".jsonl", ".json"} and p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: folder holds no .jsonl or .json file")
    return files


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


def read_records(file: Path) -> list[tuple[int, object | str]]:
    """``(line, parsed object)`` per record, or ``(line, "invalid JSON: …")`` strings for bad lines."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return [(raw[: err.start].count(b"\n") + 1, f"file is not UTF-8 ({err.reason} at byte {err.start})")]
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(0, obj) for obj in json.loads(text)]
        except json.JSONDecodeError as err:
            return [(err.lineno, f"invalid JSON: {err.msg} (column {err.colno})")]
    records: list[tuple[int, object | str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            records.append((number, f"invalid JSON: {err.msg} (column {err.colno})"))
    return records


def read_rows(files: Sequence[Path], skip_bad: bool = False) -> Rows:
    """Read and check every row of ``files``; bad rows become problems (or counted skips)."""
    out = Rows()
    for file in files:
        for number, obj in read_records(file):
            where = f"{file}:{number}" if number else f"{file}[{len(out.where)}]"
            problems = [obj] if isinstance(obj, str) else _check_row(obj)
            if problems:
                if skip_bad:
                    out.skipped += 1
                else:
                    out.problems.extend(f"{where}: {p}" for p in problems)
                continue
            out.rows.append({name: obj[name] for name in REQUIRED_FIELDS})
            out.where.append(where)
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic shuffled split; validation gets ``round(n * val_fraction)`` rows (at least 1)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise DataError(f"cannot split {n} row(s) with val_fraction={val_fraction}: nothing left to train on")
    return sorted(order[n_val:]), sorted(order[:n_val])


def fingerprint(rows: Sequence[dict]) -> str:
    """A short content hash of rows (order-sensitive), for logs and cache keys."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:12]
