"""The LightningDataModule: download, read and check, split, encode once, batch."""

from __future__ import annotations

from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Subset

from medsft_lightning import hub
from medsft_lightning.data import checks
from medsft_lightning.data.collate import IGNORE_INDEX, pad_collate
from medsft_lightning.data.encoded_cache import encode_cached
from medsft_lightning.data.encoding import build_prompts, encode_example, token_lengths
from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT, with_no_think
from medsft_lightning.data.packing import PackedDataset, pack_collate, pack_rows
from medsft_lightning.data.questions import read_questions
from medsft_lightning.data.sampler import PAD_INDEX, WindowBatchSampler, shard_rows
from medsft_lightning.data.sources import DataError, Rows, fingerprint, read_rows, select_data_files, split_indices

__all__ = ["MedicalDataModule", "EncodedDataset", "encode_example"]


class EncodedDataset(torch.utils.data.Dataset):
    """Encoded rows, indexed by ints or by the sampler's ``(index, window_tokens)`` pairs."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, window = key if isinstance(key, tuple) else (key, None)
        if index == PAD_INDEX:  # keeps data-parallel ranks in step; trains on nothing
            row = dict(self.rows[0], labels=[IGNORE_INDEX] * len(self.rows[0]["labels"]), num_supervised=0)
        else:
            row = self.rows[index]
        row = {k: row[k] for k in ("input_ids", "attention_mask", "labels", "row_id")}
        if window is not None:
            row["window_tokens"] = window
        return row


class MedicalDataModule(L.LightningDataModule):
    """Medical reasoning rows (``question``/``think``/``answer``) for supervised fine-tuning.

    Args:
        dataset: a ModelScope dataset id, a local .jsonl/.json file or folder of them, or
            ``medsft:sample`` (the packaged offline sample).
        dataset_revision: ModelScope revision (branch, tag or commit) of ``dataset``.
        data_files: which files of a dataset folder (``dataset``, and ``val_dataset`` when a folder) hold the
            rows: glob patterns relative to the folder (``**`` recurses), each matching a file in every folder
            it is applied to. ``None``: every ``.jsonl`` and ``.json`` file except hub metadata
            (``configuration.json``, ``dataset_infos.json``, …: ``sources.HUB_METADATA_FILES``). Hidden files
            and folders (hub cache state) are never read; a dataset given as a file is read as given.
        val_dataset: an explicit validation file/folder/id; replaces the random split when set.
        val_fraction: share of ``dataset`` held out for validation when no ``val_dataset`` is given; the
            seed tutorial's rule: after a seeded shuffle the first ``int(n * (1 - val_fraction))`` rows train.
        split_seed: seed of the train/validation split (``random.Random(split_seed).shuffle``, as the seed's
            ``random.seed(42); random.shuffle(rows)``).
        tokenizer: the tokenizer's model id or folder (linked to ``model.model_name_or_path``).
        tokenizer_revision: hub revision of ``tokenizer`` (linked to ``model.model_revision``).
        system_prompt: system turn of every conversation (``""`` for none).
        max_length: longest encoded row in tokens; longer rows lose the end of their answer.
        batch_size: rows per micro-batch on each device.
        pad_to_multiple_of: round each batch's padded length up to a multiple of this (``None``: off).
        batching: how training rows become micro-batches. ``pad``: ``batch_size`` shuffled rows, right-padded
            to the longest. ``group_by_length``: rows of similar length together (less padding, same rows per
            step). ``pack``: rows concatenated without padding into ``batch_size`` sequences of at most
            ``max_length`` tokens, attention kept inside each example (fewest tokens per epoch; fewer,
            larger optimizer steps). Validation always uses ``pad``.
        shuffle_seed: seed of the per-epoch shuffling of training rows (and of which rows ``no_think_share`` takes).
        no_think_share: share of training rows (chosen by ``shuffle_seed``) turned into Qwen3 non-thinking turns:
            ``/no_think`` after the question, an empty think block before the answer, supervised (0: none).
        on_bad_rows: ``error`` stops on the first read with every bad row listed; ``skip`` counts
            and skips them.
        empty_think: rows whose ``think`` is empty or blank: ``keep`` (counted), ``drop`` (counted and
            removed) or ``error`` (a bad row, see ``on_bad_rows``).
        duplicates: rows asking a question (same text after strip) that an earlier row of the same source,
            or a training row for a validation row, asks: ``keep`` (counted), ``drop`` (the first is kept)
            or ``error`` (a bad row).
        too_long: rows longer than ``max_length`` tokens: ``truncate`` (the end of the answer is cut),
            ``drop`` or ``error`` (a bad row, listed as ``file:line: N tokens > max_length M``).
        num_workers: DataLoader worker processes (0 = in the main process).
        cache_dir: where downloads and the encoded-row cache go (default: ModelScope's cache).
        predict_dataset: ``medsft predict`` input: a .jsonl/.json file of rows with ``question`` (optional
            ``id``, optional ``system``); ``None`` answers the validation split.
    """

    def __init__(
        self,
        dataset: str = "krisfu/delicate_medical_r1_data",
        dataset_revision: str | None = "master",
        data_files: list[str] | None = None,
        val_dataset: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 42,
        tokenizer: str = hub.TINY_MODEL,
        tokenizer_revision: str | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_length: int = 2048,
        batch_size: int = 4,
        pad_to_multiple_of: int | None = None,
        batching: Literal["pad", "group_by_length", "pack"] = "pad",
        shuffle_seed: int = 42,
        no_think_share: float = 0.0,
        on_bad_rows: Literal["error", "skip"] = "error",
        empty_think: Literal["keep", "drop", "error"] = "keep",
        duplicates: Literal["keep", "drop", "error"] = "keep",
        too_long: Literal["truncate", "drop", "error"] = "truncate",
        num_workers: int = 0,
        cache_dir: str | None = None,
        predict_dataset: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_obj = None
        self.train_set: EncodedDataset | None = None
        self.val_set: EncodedDataset | None = None
        self.val_rows: Rows | None = None
        self.train_rows: Rows | None = None
        self.no_think_ids: list[int] = []  # training rows turned into non-thinking turns (data.no_think_share)
        self.predict_rows: list[dict] = []
        self.predict_skip_ids: set = set()  # ids already answered (set by the prediction writer)
        self.stats: dict[str, int | str] = {}
        self.resume_state: dict = {}  # from a checkpoint: where training stood inside its epoch

    # -- preparation (rank 0 of each node): downloads only ---------------------------------------
    def prepare_data(self) -> None:
        hp = self.hparams
        hub.resolve_dataset(hp.dataset, hp.dataset_revision, hp.cache_dir)
        if hp.val_dataset:
            hub.resolve_dataset(hp.val_dataset, hp.dataset_revision, hp.cache_dir)
        hub.resolve_model(hp.tokenizer, hp.tokenizer_revision, hp.cache_dir, tokenizer_only=True)

    def load_tokenizer(self):
        if self.tokenizer_obj is None:
            from transformers import AutoTokenizer

            hp = self.hparams
            path = hub.resolve_model(hp.tokenizer, hp.tokenizer_revision, hp.cache_dir, tokenizer_only=True)
            self.tokenizer_obj = AutoTokenizer.from_pretrained(path)
        return self.tokenizer_obj

    def _read(self, name: str) -> Rows:
        """One source's rows, read and checked; its problems are collected, not raised."""
        hp = self.hparams
        skip = hp.on_bad_rows == "skip"
        chosen = select_data_files(hub.resolve_dataset(name, hp.dataset_revision, hp.cache_dir), hp.data_files)
        rows = read_rows(chosen.files, skip_bad=skip)
        rank_zero_info(f"[data] {name}: {chosen.summary(rows)}")
        checks.check_rows(rows, hp.empty_think, hp.duplicates, skip)
        if hp.too_long == "error":
            lengths = token_lengths(rows.rows, self.load_tokenizer(), system_prompt=hp.system_prompt)
            checks.check_lengths(rows, lengths, hp.max_length, skip)
        return rows

    def split_rows(self) -> tuple[Rows, Rows]:
        """Read and check the sources and return ``(train, val)`` rows; one error lists every problem."""
        hp = self.hparams
        skip = hp.on_bad_rows == "skip"
        rows = self._read(hp.dataset)
        val = self._read(hp.val_dataset) if hp.val_dataset else None
        overlap = checks.check_overlap(rows, val, hp.duplicates, skip) if val is not None else 0
        names = " and ".join(n for n in (hp.dataset, hp.val_dataset) if n)
        Rows(problems=rows.problems + (val.problems if val is not None else [])).raise_if_problems(names)
        self.stats.update(dict.fromkeys(checks.COUNT_KEYS, 0))
        checks.report(rows, hp.dataset, self.stats)
        if val is not None:
            checks.report(val, hp.val_dataset, self.stats)
            self.stats["val_questions_in_train"] = overlap
            return rows, val
        train_idx, val_idx = split_indices(len(rows.rows), hp.val_fraction, hp.split_seed)

        def pick(idx: list[int]) -> Rows:
            return Rows([rows.rows[i] for i in idx], [rows.where[i] for i in idx])

        train, val = pick(train_idx), pick(val_idx)
        # Only kept duplicates can straddle the split (drop/error already left one row per question).
        self.stats["val_questions_in_train"] = checks.check_overlap(train, val, "keep", skip)
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":  # each row with its prompt ids (the answers file's record keeps their digests)
            rows = self._question_rows()
            prompts = build_prompts(rows, self.load_tokenizer(), self.hparams.system_prompt) if rows else []
            self.predict_rows = [{**r, "prompt_ids": p} for r, p in zip(rows, prompts)]
            return
        if self.train_set is not None:
            return
        self.train_rows, self.val_rows = self.split_rows()
        self.train_rows.rows, self.no_think_ids = with_no_think(self.train_rows.rows, self.hparams.no_think_share,
                                                                self.hparams.shuffle_seed)
        self.stats.update({"train_no_think": len(self.no_think_ids)} if self.no_think_ids else {})
        self.train_set = self._encode(self.train_rows, "train")
        self.val_set = self._encode(self.val_rows, "val")
        devices = self.trainer.world_size if self.trainer is not None else 1
        checks.check_one_batch(len(self.train_set), self.hparams.batch_size, devices)
        self._publish_stats()

    def _publish_stats(self) -> None:
        """Log the data stats once and record them with the run's hyperparameters (``data_stats``)."""
        rank_zero_info("[data] stats: " + ", ".join(f"{k}={v}" for k, v in self.stats.items()))
        for lg in self.trainer.loggers if self.trainer is not None else []:
            lg.log_hyperparams({"data_stats": dict(self.stats)})

    def _question_rows(self) -> list[dict]:
        """Rows to answer, in input order, each with a unique ``id`` (default: its 0-based position)."""
        if self.hparams.predict_dataset:
            return read_questions(self.hparams.predict_dataset)
        _, val = self.split_rows()
        return [{"id": i, "question": r["question"]} for i, r in enumerate(val.rows)]

    def _encode(self, rows: Rows, split: str) -> EncodedDataset:
        content = fingerprint(rows.rows)
        hp = self.hparams
        name = f"{hp.tokenizer}@{hp.tokenizer_revision}" if hp.tokenizer_revision else hp.tokenizer
        encoded = encode_cached(rows.rows, content, self.load_tokenizer(), name, hp.system_prompt,
                                hp.max_length, hub.medsft_cache(hp.cache_dir) / "encoded")
        drop_long = hp.too_long == "drop"
        kept = [{**enc, "row_id": row_id} for row_id, enc in enumerate(encoded)
                if enc is not None and not (drop_long and enc["truncated"])]
        checks.report_encoded(split, len(rows.rows), encoded, kept, hp.max_length, content, self.stats)
        if not kept:
            raise ValueError(f"data: no trainable {split} row left at data.max_length={self.hparams.max_length}")
        return EncodedDataset(kept)

    # -- loaders ------------------------------------------------------------------------------
    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_collate(rows, self.load_tokenizer().pad_token_id, self.hparams.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        hp, trainer, rows = self.hparams, self.trainer, self.train_set.rows
        dataset, collate = self.train_set, self._collate
        if hp.batching == "pack":
            lengths = [len(r["input_ids"]) for r in rows]
            dataset = PackedDataset(rows, pack_rows(lengths, hp.max_length, hp.shuffle_seed))
            collate = partial(pack_collate, pad_id=self.load_tokenizer().pad_token_id)
            rank_zero_info(f"[data] packing: {len(rows)} rows into {len(dataset)} sequences of <= {hp.max_length} "
                           f"tokens ({sum(lengths) / (len(dataset) * hp.max_length):.0%} full)")
        sampler = WindowBatchSampler(
            [r["num_supervised"] for r in rows] if dataset is self.train_set else dataset.num_supervised,
            batch_size=hp.batch_size,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            seed=hp.shuffle_seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            lengths=[len(r["input_ids"]) for r in rows] if hp.batching == "group_by_length" else None,
            group_by_length=hp.batching == "group_by_length",
        )
        if self.resume_state:
            self._resume(sampler)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=hp.num_workers)

    # -- exact resume ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Saved in every checkpoint: the epoch and how many micro-batches of it this rank has trained on."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": done,
                "train_fingerprint": self.stats.get("train_fingerprint"), "batching": self.hparams.batching,
                "batch_size": self.hparams.batch_size, "shuffle_seed": self.hparams.shuffle_seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_state = dict(state_dict)

    def _resume(self, sampler: WindowBatchSampler) -> None:
        state, hp = self.resume_state, self.hparams
        now = {"train_fingerprint": self.stats.get("train_fingerprint"), "batching": hp.batching,
               "batch_size": hp.batch_size, "shuffle_seed": hp.shuffle_seed}
        changed = [f"{k}: {state.get(k)!r} in the checkpoint, {v!r} now" for k, v in now.items() if state.get(k) != v]
        if changed and 0 < state["batches_done"] < len(sampler):
            raise DataError("cannot resume mid-epoch: the training batches differ from the checkpoint's ("
                            + "; ".join(changed) + "). Resume with the same data and data.* options, or from an "
                            "end-of-epoch checkpoint.")
        sampler.resume_at(state["epoch"], state["batches_done"])
        rank_zero_info(f"[data] resuming epoch {state['epoch']} after its first {state['batches_done']} micro-batches")

    def predict_dataloader(self) -> DataLoader:
        """Rows not answered yet, in batches of similar prompt length (less left padding)."""
        todo = [r for r in self.predict_rows if r["id"] not in self.predict_skip_ids]
        items = sorted(todo, key=lambda r: len(r["prompt_ids"]))
        if self.trainer is not None and self.trainer.world_size > 1:  # each process answers every N-th row
            items = items[self.trainer.global_rank :: self.trainer.world_size]
        return DataLoader(items, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=list)

    def val_dataloader(self) -> DataLoader:
        """Rank r of W validates rows r, r+W, …, padded so that every rank runs the same number of batches."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        shard = shard_rows(len(self.val_set), world, rank)
        return DataLoader(Subset(self.val_set, shard), batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=self._collate, num_workers=self.hparams.num_workers)

