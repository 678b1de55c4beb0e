"""Reading a multiple-choice benchmark from a file or folder: its files, its split, its questions, checked.

A source is a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a ``.zip`` of them, or a folder (a downloaded
ModelScope snapshot, an unpacked release) holding any of those at any depth. Where the file names carry a split
(``val/clinical_medicine_val.csv``, ``validation-00000-of-00001.parquet``, ``dev.json``), one split is read: the
one asked for, else the first of the layout's :data:`EVAL_SPLITS` present (the test splits of C-Eval and CMB
carry no answers). Every record becomes a question in medsft's schema (:mod:`~medsft_lightning.data.mcq_layouts`);
every bad one is a problem named ``file:line: field: what is wrong``, and one :class:`DataError` line reports the
first with the count of the rest. Nothing is dropped silently: files and subjects left out are listed in
:attr:`McqSet.notes`.
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from medsft_lightning.data import mcq_layouts as layouts
from medsft_lightning.data.sources import HUB_METADATA_FILES, DataError, read_records

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_NAMES = {"test": "test", "val": "val", "valid": "val", "validation": "val", "dev": "dev", "train": "train"}
# the split that holds each layout's evaluation questions with answers, in order of preference
EVAL_SPLITS = {"ceval": ("val",), "cmb": ("val",), "cmmlu": ("test",), "medmcqa": ("val", "dev"),
               "medqa": ("test",), "cmexam": ("test",), "mcq": ("test", "val"), "choices": ("test", "val")}
NOT_DATA = set(HUB_METADATA_FILES) | {"README.md", "LICENSE"}


@dataclass
class McqSet:
    """One benchmark's questions (medsft's schema plus ``benchmark`` and ``where``) and notes on what was read."""

    name: str
    layout: str
    questions: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def split_of(relative: str) -> str | None:
    """The split a file's path names, if any: ``val/x_val.csv`` → ``val``, ``validation-0.parquet`` → ``val``."""
    for token in re.split(r"[\\/_.\-\s]+", relative.lower()):
        if token in SPLIT_NAMES:
            return SPLIT_NAMES[token]
    return None


def data_files(root: Path, work: Path) -> list[tuple[str, str, Path]]:
    """``(name relative to root, label for messages, path)`` of every data file of a file or folder, ``.zip``
    members unpacked into ``work`` (labelled ``archive.zip!member``)."""
    if root.is_file():
        candidates = [(root.name, root)]
    else:
        candidates = [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    out = []
    for name, path in candidates:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                for member in sorted(archive.namelist()):
                    if Path(member).suffix in SUFFIXES and not member.startswith(("__MACOSX", ".")):
                        out.append((f"{name}!{member}", f"{path}!{member}",
                                    Path(archive.extract(member, work / path.stem))))
        elif path.suffix in SUFFIXES and path.name not in NOT_DATA:
            out.append((name, str(path), path))
    return out


def records(label: str, path: Path) -> Iterator[tuple[str, object]]:
    """``(where, record or "what is wrong")`` for every record of one data file."""
    if path.suffix == ".csv":
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            yield f"{label}:1", f"encoding: not UTF-8 ({err.reason} at byte {err.start}); save the file as UTF-8"
            return
        reader, start = csv.DictReader(io.StringIO(text, newline="")), 2
        for row in reader:
            yield f"{label}:{start}", {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # datasets' own dependency

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{label}[{index}]", row
    else:
        for index, (line, obj) in enumerate(read_records(path)):
            yield (f"{label}:{line}" if line else f"{label}[{index}]"), obj


def _first_layout(files: Sequence[tuple[str, str, Path]]) -> str | None:
    for _, label, path in files:
        for _, obj in records(label, path):
            if isinstance(obj, dict):
                return layouts.detect_layout(set(obj))
    return None


def choose_split(files: list[tuple[str, str, Path]], layout: str, split: str | None) -> tuple[list, str | None, list]:
    """``(files to read, their split, files left out)``: see the module docstring."""
    named = {name: split_of(name) for name, _, _ in files}
    present = {s for s in named.values() if s}
    if split is None and not present:
        return files, None, []
    if split is not None and split not in present:
        found = ", ".join(sorted(present)) or "none"
        raise DataError(f"--split={split}: no file name carries that split (found: {found})")
    chosen = split or next((s for s in EVAL_SPLITS.get(layout, ()) if s in present), None)
    if chosen is None:
        raise DataError(f"no file carries an evaluation split of {layout} ({', '.join(EVAL_SPLITS[layout])}); found "
                        f"{', '.join(sorted(present))}: name one with --split")
    return ([f for f in files if named[f[0]] == chosen], chosen, [n for n, _, _ in files if named[n] != chosen])


def _subject_from_name(label: str) -> str:
    stem = Path(label.split("!")[-1]).stem
    return re.sub(r"_(val|dev|test|train)$", "", stem)


def read_mcq(root: Path, name: str, layout: str | None = None, split: str | None = None) -> McqSet:
    """The questions of a benchmark file or folder (see the module docstring).

    Args:
        root: the file or folder.
        name: the benchmark's name in reports (``benchmark`` of every question).
        layout: one of :data:`~medsft_lightning.data.mcq_layouts.LAYOUTS`; ``None``: recognised per file.
        split: which split to read where file names carry one; ``None``: the layout's evaluation split.
    """
    with tempfile.TemporaryDirectory(prefix="medsft-mcq-") as work:
        files = data_files(root, Path(work))
        if not files:
            raise FileNotFoundError(f"{root}: holds no {', '.join(SUFFIXES)} or .zip data file")
        first = layout or _first_layout(files) or "mcq"
        files, chosen, left_out = choose_split(files, first, split)
        out = McqSet(name, first)
        problems: list[str] = []
        for name, label, path in files:
            problems += _read_file(name, label, path, layout, out, several=len(files) > 1)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    out.notes.insert(0, f"read {len(files)} file(s){f' of split {chosen}' if chosen else ''} as layout {out.layout}: "
                        f"{len(out.questions)} questions")
    if left_out:
        out.notes.append(f"left out {len(left_out)} file(s) of other splits ({', '.join(left_out[:5])}"
                         f"{', …' if len(left_out) > 5 else ''}); --split chooses")
    if not out.questions:
        raise DataError(f"{root}: no question left to evaluate ({'; '.join(out.notes)})")
    return out


def _read_file(name: str, label: str, path: Path, layout: str | None, out: McqSet, several: bool) -> list[str]:
    """Append one file's questions to ``out``; return its problems."""
    items = list(records(label, path))
    dicts = [obj for _, obj in items if isinstance(obj, dict)]
    kind = layout or (layouts.detect_layout(set(dicts[0])) if dicts else None)
    if kind is None:
        fields = ", ".join(sorted(dicts[0])[:12]) if dicts else "none"
        return [f"{items[0][0] if items else label}: fields: no known layout has these fields ({fields}); "
                f"give --layout ({', '.join(layouts.LAYOUTS)}) or convert the file to medsft's schema"]
    convert = layouts.CONVERTERS[kind]
    if kind == "medmcqa":
        base = layouts.medmcqa_base([obj.get("cop") for obj in dicts])
        if isinstance(base, str):
            return [f"{label}: {base}"]
        convert = partial(layouts.medmcqa_question, base=base)
    problems, seen = [], set()
    for position, (where, obj) in enumerate(items):
        question = obj if isinstance(obj, str) else (
            convert(obj) if isinstance(obj, dict) else f"row: expected an object, got {type(obj).__name__}")
        if isinstance(question, str):
            problems.append(f"{where}: {question}")
            continue
        row_id = question.pop("id", position)
        if row_id in seen:
            problems.append(f"{where}: id: {row_id!r} appears twice")
            continue
        seen.add(row_id)
        if question["subject"] is None and kind in ("ceval", "cmmlu"):
            question["subject"] = _subject_from_name(name)
        question_id = f"{name.rsplit('.', 1)[0]}/{row_id}" if several else row_id  # unique across the files
        out.questions.append({"id": question_id, **question, "benchmark": out.name, "where": where})
    return problems


def keep_subjects(out: McqSet, wanted: set[str]) -> None:
    """Keep only the questions of the ``wanted`` subjects; a note counts what was left out."""
    kept = [q for q in out.questions if q["subject"] in wanted]
    dropped = sorted({q["subject"] or "(none)" for q in out.questions if q["subject"] not in wanted})
    if dropped:
        shown = ", ".join(sorted(wanted & {q["subject"] for q in kept}))
        others = ", ".join(dropped[:8]) + (", …" if len(dropped) > 8 else "")
        out.notes.append(f"kept {len(kept)} questions of the subjects {shown}; left out "
                         f"{len(out.questions) - len(kept)} of {len(dropped)} other subject(s) ({others});"
                         " --subjects all keeps them")
    out.questions = kept
