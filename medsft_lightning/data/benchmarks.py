"""Benchmarks by name: which ModelScope dataset holds each, its layout, split and medical subjects.

A SOURCE of ``medsft eval --data`` is a local file or folder (read as it is), ``medsft:mcq-sample`` (the
packaged sample: 24 questions written for medsft, 12 Chinese and 12 English, 5 of them multi-answer), a name
below (downloaded from ModelScope through :func:`medsft_lightning.hub.download_dataset`, the one function that
downloads datasets), or any other ModelScope dataset id ``owner/name`` (downloaded, its layout recognised).

The ids are the ones the peers' registries use, so that medsft reads the same copy they score:

- ``ceval-medical``: ``opencompass/ceval-exam``, OpenCompass ``opencompass/utils/datasets_info.py`` (C-Eval);
- ``cmmlu-medical``: ``opencompass/cmmlu``, the same file (CMMLU);
- ``medmcqa``: ``extraordinarylab/medmcqa``, EvalScope ``evalscope/benchmarks/med_mcqa/med_mcqa_adapter.py``.

Neither registry names a ModelScope copy of CMB-Exam, CMExam or MedQA (OpenCompass reads CMB from a local
``./data/CMB`` and MedQA from Hugging Face): give their files or folders (``--layout cmb``/``cmexam``/``medqa``,
or recognised from the fields). C-Eval is CC BY-NC-SA 4.0 and CMMLU CC BY-NC 4.0: medsft ships none of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from medsft_lightning import hub
from medsft_lightning.data.mcq_files import McqSet, keep_subjects, read_mcq
from medsft_lightning.data.sources import DataError

logger = logging.getLogger(__name__)
MCQ_SAMPLE = "medsft:mcq-sample"
# C-Eval's subjects of (human) medicine; CMMLU's medical and health subjects
CEVAL_MEDICAL = ("basic_medicine", "clinical_medicine", "physician")
CMMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medical_statistics", "college_medicine", "genetics",
                 "nutrition", "professional_medicine", "traditional_chinese_medicine", "virology")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark medsft can download: its ModelScope id, layout, evaluation split and medical subjects."""

    modelscope_id: str
    layout: str
    split: str | None
    medical_subjects: tuple[str, ...] | None
    registry: str


BENCHMARKS = {
    "ceval-medical": Benchmark("opencompass/ceval-exam", "ceval", "val", CEVAL_MEDICAL,
                               "OpenCompass opencompass/utils/datasets_info.py"),
    "cmmlu-medical": Benchmark("opencompass/cmmlu", "cmmlu", "test", CMMLU_MEDICAL,
                               "OpenCompass opencompass/utils/datasets_info.py"),
    "medmcqa": Benchmark("extraordinarylab/medmcqa", "choices", "val", None,
                         "EvalScope evalscope/benchmarks/med_mcqa/med_mcqa_adapter.py"),
}
MEDICAL_SUBJECTS = {"ceval": CEVAL_MEDICAL, "cmmlu": CMMLU_MEDICAL}


def mcq_sample_path() -> Path:
    """The packaged multiple-choice sample (medsft's schema, written for medsft)."""
    return Path(str(resources.files("medsft_lightning.hub").joinpath("sample_data/mcq_sample.jsonl")))


def benchmark_name(source: str, path: Path) -> str:
    """A short name for reports: the benchmark's, else the file's or folder's own name."""
    if source == MCQ_SAMPLE or source in BENCHMARKS:
        return source.removeprefix("medsft:")
    if "/" in source and not Path(source).expanduser().exists():
        return source.split("/")[-1]
    return path.stem if path.is_file() else path.name


def locate(source: str, revision: str | None = None, cache_dir: str | None = None) -> tuple[Path, Benchmark | None]:
    """A local file or folder for ``source`` (downloading a named benchmark or ModelScope id), and its entry."""
    if source == MCQ_SAMPLE:
        return mcq_sample_path(), None
    local = Path(os.path.expandvars(source)).expanduser()
    if local.exists():
        return local, None
    entry = BENCHMARKS.get(source)
    if entry is not None:
        logger.info("[eval] %s: downloading ModelScope dataset %s (the id %s uses)", source, entry.modelscope_id,
                    entry.registry)
        return Path(hub.download_dataset(entry.modelscope_id, revision=revision, cache_dir=cache_dir)), entry
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and Path(source).suffix == "":
        return hub.resolve_dataset(source, revision, cache_dir), None
    names = ", ".join([MCQ_SAMPLE, *BENCHMARKS])
    raise FileNotFoundError(f"--data {source!r}: no such file or folder, and not a benchmark name ({names}) or a "
                            "ModelScope dataset id (owner/name)")


def load_benchmark(source: str, layout: str | None = None, split: str | None = None,
                   subjects: str | Sequence[str] = "medical", revision: str | None = None,
                   cache_dir: str | None = None) -> McqSet:
    """The questions of one SOURCE (see the module docstring).

    Args:
        source: a file, folder, benchmark name or ModelScope id.
        layout: the layout of its files (``None``: the benchmark's, else recognised from the fields).
        split: the split to read where file names carry one (``None``: the layout's evaluation split).
        subjects: ``"medical"``: C-Eval's and CMMLU's medical subjects only (other layouts: every subject);
            ``"all"``; or the subjects to keep.
        revision: ModelScope revision of a downloaded benchmark.
        cache_dir: ModelScope's download cache (``None``: its default).
    """
    path, entry = locate(source, revision, cache_dir)
    layout = layout or (entry.layout if entry else None)
    questions = read_mcq(path, benchmark_name(source, path), layout, split or (entry.split if entry else None))
    keep = _subjects(subjects, entry.medical_subjects if entry else MEDICAL_SUBJECTS.get(questions.layout))
    if keep is not None:
        keep_subjects(questions, set(keep))
        if not questions.questions:
            raise DataError(f"--data {source!r}: no question of the subjects {', '.join(keep)} "
                             f"({'; '.join(questions.notes)})")
    for note in questions.notes:
        logger.info("[eval] %s: %s", questions.name, note)
    return questions


def _subjects(subjects: str | Sequence[str], medical: Sequence[str] | None) -> Sequence[str] | None:
    if subjects == "all":
        return None
    if subjects == "medical":
        return medical
    return [subjects] if isinstance(subjects, str) else list(subjects)
