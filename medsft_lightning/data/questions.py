"""The questions ``medsft predict`` answers: a JSON/JSONL file (``data.predict_dataset``), checked row by row."""

from __future__ import annotations

import os
from pathlib import Path

from medsft_lightning.data.sources import DataError, read_records


def read_questions(path: str | os.PathLike) -> list[dict]:
    """Rows with a non-empty ``question`` (optional ``id``, ``system``), checked with file:line errors."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.predict_dataset={str(path)!r}: no such file")
    rows, problems, seen = [], [], set()
    for position, (line, obj) in enumerate(read_records(file)):
        where = f"{file}:{line}"
        if isinstance(obj, str):
            problems.append(f"{where}: {obj}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            problems.append(f"{where}: question: missing, empty or not a string")
            continue
        row_id = obj.get("id", position)
        if row_id in seen:
            problems.append(f"{where}: id: {row_id!r} appears twice")
            continue
        seen.add(row_id)
        row = {"id": row_id, "question": obj["question"]}
        if isinstance(obj.get("system"), str):
            row["system"] = obj["system"]
        rows.append(row)
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {file}:\n  " + "\n  ".join(problems[:20]))
    return rows
