"""Multiple-choice questions: medsft's schema, and the public benchmark layouts turned into it.

medsft's schema (``--layout mcq``), one JSON object per line::

    {"id": "q1", "question": "…", "options": {"A": "…", "B": "…", "C": "…", "D": "…", "E": "…"},
     "answer": "B", "subject": "cardiology"}

``options``: two to eight options keyed by consecutive letters from ``A``; ``answer``: one letter, or several
for a multi-answer question (``"ABD"``; ``"A,B,D"`` and ``"A、B、D"`` read the same); ``id`` (string or integer,
default: the position) and ``subject`` are optional.

The public layouts (fields as their releases spell them; the layout of a file is recognised from its fields,
:func:`detect_layout`, or named with ``--layout``):

- ``cmb``: CMB-Exam (``question``, ``option`` {A…}, ``answer``, ``exam_subject``/``exam_class``);
- ``cmexam``: CMExam CSV (``Question``, ``Options`` as ``"A text\\nB text"`` lines, ``Answer``);
- ``medqa``: MedQA, MCMLE (zh) and USMLE (en) (``question``, ``options`` {A…}, ``answer_idx``, ``meta_info``);
- ``medmcqa``: MedMCQA (``question``, ``opa``…``opd``, ``cop``: 0–3 in the Hugging Face/ModelScope release, 1–4
  in the original JSON; read per file, :func:`medmcqa_base`), ``subject_name``;
- ``ceval``: C-Eval CSV (``id``, ``question``, ``A``…``D``, ``answer``; the subject is the file name);
- ``cmmlu``: CMMLU CSV (``Question``, ``A``…``D``, ``Answer``; the subject is the file name);
- ``choices``: a ``choices`` list with a letter (or ``(A)``, or an index) ``answer``, as EvalScope's processed
  copies hold them (``extraordinarylab/medmcqa``, ``evalscope/cmmlu``).

Every converter is pure: a record in, a question dict (``id``, ``question``, ``options``, ``answer``,
``subject``) or a ``"field: what is wrong"`` string out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

LETTERS = "ABCDEFGH"
LAYOUTS = ("mcq", "cmb", "cmexam", "medqa", "medmcqa", "ceval", "cmmlu", "choices")
_SEPARATORS = re.compile(r"[\s,，、;；/和及与]+")
_OPTION_LINE = re.compile(r"^\s*\(?([A-H])\)?\s*[\.．、:：)）]?\s*(.*?)\s*$")


def letters_of(value: object, field: str = "answer") -> str:
    """An answer as sorted, distinct upper-case letters (``"B"``, ``"ABD"``) or ``"field: …"`` when unreadable.

    >>> letters_of("a, D、b"), letters_of("(C)"), letters_of("F?")
    ('ABD', 'C', 'answer: not option letters: F?')
    """
    text = str(value).strip().upper().strip("()（）[]")
    parts = [p for p in _SEPARATORS.split(text.replace("AND", " ")) if p]
    letters = "".join(parts)
    if not letters or any(ch not in LETTERS for ch in letters):
        return f"{field}: not option letters: {value}" if str(value).strip() else f"{field}: empty"
    return "".join(sorted(set(letters)))


def _text(record: Mapping, field: str) -> str | None:
    value = record.get(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value.strip() if isinstance(value, str) and value.strip() else None


def build(record: Mapping, question_field: str, options: Mapping[str, object] | str, answer: object,
          subject: object = None, id_field: str = "id") -> dict | str:
    """Check the parts of one question and return it in medsft's schema (or ``"field: what is wrong"``)."""
    question = _text(record, question_field)
    if question is None:
        return f"{question_field}: missing or empty"
    if isinstance(options, str):
        return options
    kept = {k.strip().upper(): str(v).strip() for k, v in options.items() if v is not None and str(v).strip()}
    letters = "".join(sorted(kept))
    if len(kept) < 2 or letters != LETTERS[: len(kept)]:
        return f"options: need 2 to {len(LETTERS)} non-empty options lettered from A, got {letters or 'none'}"
    gold = letters_of(answer)
    if gold.startswith("answer"):
        return gold
    if not set(gold) <= set(kept):
        return f"answer: {gold} is not among the options {letters}"
    out = {"question": question, "options": {k: kept[k] for k in letters}, "answer": gold,
           "subject": str(subject).strip() if subject not in (None, "") else None}
    row_id = record.get(id_field)
    if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) and str(row_id).strip():
        out["id"] = row_id
    return out


def _mcq(r: Mapping) -> dict | str:
    options = r.get("options")
    if not isinstance(options, Mapping):
        return "options: expected an object of lettered options, e.g. {\"A\": \"…\", \"B\": \"…\"}"
    return build(r, "question", options, r.get("answer", ""), r.get("subject"))


def _cmb(r: Mapping) -> dict | str:
    options = r.get("option")
    if not isinstance(options, Mapping):
        return "option: expected an object of lettered options"
    return build(r, "question", options, r.get("answer", ""), r.get("exam_subject") or r.get("exam_class"))


def parse_option_lines(text: object) -> dict[str, str] | str:
    """CMExam's ``Options`` string (``"A 阿司匹林\\nB 布洛芬"``) as ``{"A": …}``, or ``"Options: …"``.

    >>> parse_option_lines("A 阿司匹林\\nB. 布洛芬")
    {'A': '阿司匹林', 'B': '布洛芬'}
    """
    if not isinstance(text, str) or not text.strip():
        return "Options: missing or empty"
    out: dict[str, str] = {}
    for line in text.strip().splitlines():
        match = _OPTION_LINE.match(line)
        if match is None or not match.group(2):
            return f"Options: cannot read the line {line.strip()!r} as a lettered option"
        out[match.group(1)] = match.group(2)
    return out


def _cmexam(r: Mapping) -> dict | str:
    subject = r.get("Medical Discipline") or r.get("Clinical Department")
    return build(r, "Question", parse_option_lines(r.get("Options")), r.get("Answer", ""), subject, "id")


def _medqa(r: Mapping) -> dict | str:
    options = r.get("options")
    if isinstance(options, Sequence) and not isinstance(options, str):  # bigbio-style [{"key": "A", "value": …}]
        options = {o.get("key"): o.get("value") for o in options if isinstance(o, Mapping)}
    if not isinstance(options, Mapping):
        return "options: expected an object of lettered options"
    return build(r, "question", options, r.get("answer_idx", ""), r.get("meta_info"))


def medmcqa_base(cops: Sequence[object]) -> int | str:
    """Whether a file's ``cop`` values count from 0 (Hugging Face/ModelScope) or 1 (the original JSON release)."""
    values = {c for c in cops if isinstance(c, int) and not isinstance(c, bool)}
    if 0 in values and 4 in values:
        return "cop: both 0 and 4 occur, so it is neither 0-3 nor 1-4"
    if 0 in values:
        return 0
    if 4 in values:
        return 1
    return ("cop: only values 1-3 occur, so it cannot tell 0-3 (Hugging Face release) from 1-4 (original JSON); "
            "convert the file to medsft's schema (--layout mcq)")


def medmcqa_question(r: Mapping, base: int = 0) -> dict | str:
    cop = r.get("cop")
    if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop - base < 4:
        return f"cop: expected an integer {base}-{base + 3}, got {cop!r}"
    options = {letter: r.get(f"op{letter.lower()}") for letter in "ABCD"}
    return build(r, "question", options, "ABCD"[cop - base], r.get("subject_name"))


def _columns(question_field: str, answer_field: str) -> Callable[[Mapping], dict | str]:
    def convert(r: Mapping) -> dict | str:
        options = {letter: r.get(letter) for letter in LETTERS if r.get(letter) not in (None, "")}
        return build(r, question_field, options, r.get(answer_field, ""), None)

    return convert


def _choices(r: Mapping) -> dict | str:
    choices = r.get("choices")
    if not isinstance(choices, Sequence) or isinstance(choices, str):
        return "choices: expected a list of option texts"
    texts = [re.sub(r"^\([A-H]\)\s*", "", str(c)).strip() for c in choices]
    answer = r.get("answer", "")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(texts):
            return f"answer: index {answer} is out of range for {len(texts)} choices"
        answer = LETTERS[answer]
    options = dict(zip(LETTERS, texts)) if len(texts) <= len(LETTERS) else f"choices: more than {len(LETTERS)}"
    return build(r, "question", options, answer, r.get("subject") or r.get("category") or r.get("subject_name"))


CONVERTERS: dict[str, Callable[[Mapping], dict | str]] = {
    "mcq": _mcq, "cmb": _cmb, "cmexam": _cmexam, "medqa": _medqa, "medmcqa": medmcqa_question,
    "ceval": _columns("question", "answer"), "cmmlu": _columns("Question", "Answer"), "choices": _choices,
}


def detect_layout(fields: set[str]) -> str | None:
    """The layout a record's field names show, or ``None`` (see the module docstring).

    >>> detect_layout({"question", "opa", "opb", "opc", "opd", "cop"}), detect_layout({"Question", "A", "B", "Answer"})
    ('medmcqa', 'cmmlu')
    """
    if {"question", "option", "answer"} <= fields:
        return "cmb"
    if {"Question", "Options", "Answer"} <= fields:
        return "cmexam"
    if {"question", "options", "answer_idx"} <= fields:
        return "medqa"
    if {"question", "options", "answer"} <= fields:
        return "mcq"
    if {"question", "opa", "opb", "cop"} <= fields:
        return "medmcqa"
    if {"question", "A", "B", "answer"} <= fields:
        return "ceval"
    if {"Question", "A", "B", "Answer"} <= fields:
        return "cmmlu"
    if {"question", "choices", "answer"} <= fields:
        return "choices"
    return None
