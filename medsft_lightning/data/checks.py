"""Checks across source rows, after each row is read: empty think, repeated questions, length, batch size.

Each check follows one pattern: ``keep`` (count it), ``drop`` (count it and remove the row) or
``error`` (the row becomes a problem, listed as ``file:line: field: what is wrong``; with
``data.on_bad_rows=skip`` it is skipped and counted instead, like any bad row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from medsft_lightning.data.sources import DataError, Rows

Policy = Literal["keep", "drop", "error"]
# Read-time tallies, summed over the sources read; every key is always present in the stats.
COUNT_KEYS = (
    "bad_rows_skipped",
    "boms_ignored",
    "mixed_line_ending_files",
    "empty_think_rows",
    "empty_think_dropped",
    "duplicate_questions",
    "duplicates_dropped",
    "too_long_skipped",
)
SHOWN_EXAMPLES = 5


def _apply(rows: Rows, verdicts: dict[int, tuple[str, str]], skip_bad: bool) -> None:
    """Carry out ``{row index: (verdict, problem)}``: ``drop`` removes, ``error`` lists or skips."""
    keep = [True] * len(rows.rows)
    for i, (verdict, problem) in verdicts.items():
        if verdict == "keep":
            continue
        keep[i] = False
        if verdict == "error":
            if skip_bad:
                rows.skipped += 1
            else:
                rows.problems.append(f"{rows.where[i]}: {problem}")
    rows.keep_only(keep)


def check_rows(rows: Rows, empty_think: Policy, duplicates: Policy, skip_bad: bool) -> None:
    """Empty ``think`` and questions asked by an earlier row of the same source (same text after strip).

    Args:
        rows: one source's rows; changed in place (dropped rows removed, problems and counts added).
        empty_think: what to do with a row whose ``think`` is empty or blank.
        duplicates: what to do with a row whose question an earlier row asked (the first is kept).
        skip_bad: ``data.on_bad_rows=skip``: rows that would be problems are skipped and counted.
    """
    first: dict[str, str] = {}
    verdicts: dict[int, tuple[str, str]] = {}
    for i, (row, where) in enumerate(zip(rows.rows, rows.where)):
        if not row["think"].strip():
            rows.counts["empty_think_rows"] += 1
            rows.counts["empty_think_dropped"] += empty_think == "drop"
            if empty_think != "keep":
                verdicts[i] = (empty_think, "think: empty (data.empty_think=error)")
                continue
        question = row["question"].strip()
        if question not in first:
            first[question] = where
            continue
        rows.counts["duplicate_questions"] += 1
        rows.counts["duplicates_dropped"] += duplicates == "drop"
        rows.notices.append(("duplicate_questions", f"{where}: question: same as {first[question]}"))
        verdicts[i] = (duplicates, f"question: same as {first[question]} (data.duplicates=error)")
    _apply(rows, verdicts, skip_bad)


def check_overlap(train: Rows, val: Rows, duplicates: Policy, skip_bad: bool) -> int:
    """Validation rows whose question a training row asks: kept, dropped or problems; returns their count."""
    first: dict[str, str] = {}
    for row, where in zip(train.rows, train.where):
        first.setdefault(row["question"].strip(), where)
    verdicts = {}
    for i, (row, where) in enumerate(zip(val.rows, val.where)):
        if (seen := first.get(row["question"].strip())) is not None:
            verdicts[i] = (duplicates, f"question: same as training row {seen} (data.duplicates=error)")
    if verdicts and duplicates != "error":
        shown = "; ".join(f"{val.where[i]}: same as {first[val.rows[i]['question'].strip()]}"
                          for i in list(verdicts)[:SHOWN_EXAMPLES])
        rank_zero_info(f"[data] {len(verdicts)} validation question(s) also in training "
                       f"({'dropped' if duplicates == 'drop' else 'kept'}, data.duplicates={duplicates}): {shown}")
    val.counts["duplicates_dropped"] += len(verdicts) if duplicates == "drop" else 0
    _apply(val, verdicts, skip_bad)
    return len(verdicts)


def check_lengths(rows: Rows, lengths: Sequence[int], max_length: int, skip_bad: bool) -> None:
    """``data.too_long=error``: rows longer than ``max_length`` tokens become problems (or counted skips)."""
    verdicts = {i: ("error", f"{n} tokens > max_length {max_length} (data.too_long=error)")
                for i, n in enumerate(lengths) if n > max_length}
    rows.counts["too_long_skipped"] += len(verdicts) if skip_bad else 0
    _apply(rows, verdicts, skip_bad)


def check_one_batch(train_rows: int, batch_size: int, devices: int) -> None:
    """Stop when the training split cannot fill one micro-batch on every device."""
    if train_rows < batch_size * devices:
        raise DataError(
            f"{train_rows} training row(s) left after the checks, fewer than one batch: data.batch_size="
            f"{batch_size} x {devices} device(s) = {batch_size * devices}; add rows, or lower --data.batch_size"
            + (" or --trainer.devices" if devices > 1 else "")
        )


def report_encoded(split: str, n_rows: int, encoded: Sequence[dict | None], kept: Sequence[dict], max_length: int,
                   content: str, stats: dict) -> None:
    """Add one split's encoding tallies to ``stats`` (``{split}_rows``, ``{split}_too_long``, …) and log them.

    ``encoded`` has one entry per row (``None``: the prompt alone fills ``max_length``), ``kept`` the rows
    trained on (after ``data.too_long=drop``), ``content`` the rows' fingerprint.
    """
    dropped = sum(enc is None for enc in encoded)  # the prompt alone fills max_length: nothing to supervise
    too_long = sum(enc is None or bool(enc["truncated"]) for enc in encoded)
    truncated = sum(bool(r["truncated"]) for r in kept)
    tokens = sum(r["num_supervised"] for r in kept)
    dropped_long = n_rows - len(kept) - dropped
    stats.update({f"{split}_rows": len(kept), f"{split}_too_long": too_long, f"{split}_truncated": truncated,
                  f"{split}_dropped_too_long": dropped_long, f"{split}_dropped": dropped,
                  f"{split}_supervised_tokens": tokens, f"{split}_fingerprint": content})
    rank_zero_info(
        f"[data] {split}: {len(kept)} rows (fingerprint {content}), {tokens} supervised tokens, {too_long} longer "
        f"than max_length={max_length} ({truncated} truncated, {dropped_long} dropped by data.too_long=drop, "
        f"{dropped} dropped with no supervised token left)"
    )


def report(rows: Rows, source: str, stats: dict) -> None:
    """Log one source's notices (a few of each kind) and add its tallies to ``stats``."""
    rows.counts["bad_rows_skipped"] = rows.skipped
    for key in COUNT_KEYS:
        stats[key] = stats.get(key, 0) + rows.counts[key]
    if rows.skipped:
        rank_zero_info(f"[data] {source}: skipped {rows.skipped} bad row(s) (data.on_bad_rows=skip)")
    repeats = [note for kind, note in rows.notices if kind == "duplicate_questions"]
    for kind, note in rows.notices:
        if kind != "duplicate_questions":
            rank_zero_info(f"[data] notice: {note}")
    if repeats:
        more = f"; … and {len(repeats) - SHOWN_EXAMPLES} more" if len(repeats) > SHOWN_EXAMPLES else ""
        rank_zero_info(f"[data] {source}: {len(repeats)} repeated question(s): "
                       + "; ".join(repeats[:SHOWN_EXAMPLES]) + more)
    if rows.counts["empty_think_rows"]:
        rank_zero_info(f"[data] {source}: {rows.counts['empty_think_rows']} row(s) with an empty think "
                       f"({rows.counts['empty_think_dropped']} dropped)")
