"""``medsft preview``: the data as the model will see it, checked, encoded and measured, without a model.

Builds the DataModule from a config's ``data:`` section (the tokenizer is ``model.model_name_or_path``,
as ``medsft fit`` links it), runs every data check, then prints one encoded row with its label mask
and each split's length statistics::

    medsft preview --config configs/demo.yaml [--data.max_length 256] [--row 3] [--split val]
"""

from __future__ import annotations

import logging
import math
import statistics
import sys

import yaml

from medsft_lightning import hub
from medsft_lightning.data.checks import COUNT_KEYS
from medsft_lightning.data.collate import IGNORE_INDEX

# data.X <- model.Y, as in the CLI
LINKED = {"tokenizer": "model_name_or_path", "tokenizer_revision": "model_revision", "cache_dir": "cache_dir"}
STYLES = {"masked": ("\033[2m", "\033[0m"), "train": ("\033[32m", "\033[0m")}


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from medsft_lightning.data.datamodule import MedicalDataModule

    parser = ArgumentParser(prog="medsft preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a medsft config (its model/data sections)")
    parser.add_argument("--row", type=int, default=0, help="which encoded row of the split to show (0-based)")
    parser.add_argument("--split", type=str, choices=["train", "val"], default="train", help="split of that row")
    parser.add_argument("--color", type=str, choices=["auto", "always", "never"], default="auto",
                        help="colour the masked/trained segments (auto: when stdout is a terminal)")
    parser.add_argument("--model.model_name_or_path", type=str, default=hub.TINY_MODEL, help="its tokenizer is used")
    parser.add_argument("--model.model_revision", type=str | None, default=None, help="hub revision of the model")
    parser.add_argument("--model.cache_dir", type=str | None, default=None, help="download cache")
    parser.add_class_arguments(MedicalDataModule, "data", skip=set(LINKED))
    return parser


def _config_sections(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config FILE`` replaced by the file's ``model``/``data`` settings preview knows."""
    out, args = [], iter(argv)
    for arg in args:
        if arg == "--config":
            path = next(args, "")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            out.append(arg)
            continue
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        model = {k: v for k, v in (cfg.get("model") or {}).items() if k in LINKED.values()}
        out += ["--config", yaml.safe_dump({"model": model, "data": cfg.get("data") or {}})]
    return out


def segments(input_ids: list[int], labels: list[int]) -> list[tuple[str, list[int]]]:
    """Runs of consecutive tokens that are masked (label -100) or trained: ``[("masked", ids), ("train", ids), …]``."""
    out: list[tuple[str, list[int]]] = []
    for token, label in zip(input_ids, labels):
        kind = "masked" if label == IGNORE_INDEX else "train"
        if out and out[-1][0] == kind:
            out[-1][1].append(token)
        else:
            out.append((kind, [token]))
    return out


def show_row(row: dict, tokenizer, color: bool) -> str:
    """One encoded row as decoded text, each segment marked ``[masked]…[/masked]`` or ``[train]…[/train]``."""
    parts = []
    for kind, ids in segments(row["input_ids"], row["labels"]):
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        start, end = STYLES[kind] if color else ("", "")
        parts.append(f"{start}[{kind}]{text}[/{kind}]{end}")
    return "".join(parts)


def _percentile(values: list[int], p: float) -> int:
    """Nearest-rank percentile of sorted ``values``."""
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def length_stats(split: str, rows: list[dict], stats: dict, max_length: int) -> str:
    lengths = sorted(r["length"] for r in rows)
    supervised = sum(r["num_supervised"] for r in rows)
    return (
        f"{split}: {len(rows)} rows | tokens per row before truncation: min {lengths[0]}, "
        f"median {statistics.median(lengths):g}, p90 {_percentile(lengths, 90)}, p99 {_percentile(lengths, 99)}, "
        f"max {lengths[-1]} | supervised tokens {supervised} ({supervised / len(rows):.1f} per row)\n"
        f"  longer than max_length={max_length}: {stats[f'{split}_too_long']} "
        f"({stats[f'{split}_truncated']} truncated, {stats[f'{split}_dropped_too_long']} dropped, "
        f"{stats[f'{split}_dropped']} dropped with nothing supervised left)"
    )


def main(argv: list[str]) -> None:
    import datasets

    from medsft_lightning.data.datamodule import MedicalDataModule
    from medsft_lightning.data.encoding import TemplateError
    from medsft_lightning.data.sources import DataError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    datasets.disable_progress_bars()  # the encoding progress bars would bury the preview
    parser = build_parser()
    cfg = parser.parse_args(_config_sections(argv))
    data = {**cfg.data.as_dict(), **{k: cfg.model[v] for k, v in LINKED.items()}}
    dm = MedicalDataModule(**data)
    try:
        dm.prepare_data()
        dm.setup("fit")
    except (DataError, TemplateError, FileNotFoundError, ValueError) as err:
        sys.exit(f"medsft preview: error: {err}")
    dataset, source = (dm.train_set, dm.train_rows) if cfg.split == "train" else (dm.val_set, dm.val_rows)
    if not 0 <= cfg.row < len(dataset):
        sys.exit(f"medsft preview: error: --row={cfg.row}: the {cfg.split} split has {len(dataset)} rows "
                 f"(0–{len(dataset) - 1})")
    row = dataset.rows[cfg.row]
    labels = row["labels"]
    prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    color = cfg.color == "always" or (cfg.color == "auto" and sys.stdout.isatty())
    print(f"== {cfg.split} row {cfg.row} of {len(dataset)} ({source.where[row['row_id']]})")
    print(f"   {len(row['input_ids'])} tokens: {prompt} prompt tokens (masked), {row['num_supervised']} supervised "
          f"tokens (trained), {len(labels) - prompt - row['num_supervised']} masked after the answer"
          + (f"; truncated from {row['length']} to max_length={dm.hparams.max_length}" if row["truncated"] else ""))
    print(show_row(row, dm.load_tokenizer(), color))
    no_think = set(dm.no_think_ids)
    shown = next((r for r in dm.train_set.rows if r["row_id"] in no_think), None)
    if shown is not None and cfg.split == "train" and shown is not row:
        print(f"== a non-thinking training row (data.no_think_share={dm.hparams.no_think_share}: {len(no_think)} of "
              f"{len(dm.train_rows.rows)} rows; {dm.train_rows.where[shown['row_id']]})")
        print(show_row(shown, dm.load_tokenizer(), color))
    print("== length statistics")
    for split, ds in (("train", dm.train_set), ("val", dm.val_set)):
        print(length_stats(split, ds.rows, dm.stats, dm.hparams.max_length))
    print("== checks: " + ", ".join(f"{k}={dm.stats[k]}" for k in (*COUNT_KEYS, "val_questions_in_train")))
