"""Data: from source rows to training batches.

This stage owns reading the rows (``sources``: local files or a downloaded snapshot, checked line by line),
their checks and counted skips (``checks``), a row as chat messages (``formatting``), the tokenizer's chat
template turning them into ids with the completion-only label mask (``encoding``), the on-disk cache of
encoded rows (``encoded_cache``), the per-epoch batch order sharded per rank (``sampler``), padding
collation (``collate``), packing (``packing``), the questions ``medsft predict`` answers (``questions``),
the LightningDataModule that runs them in order (``datamodule``), and ``medsft eval``'s multiple-choice
benchmarks: names and downloads (``benchmarks``), files and splits (``mcq_files``), the public layouts
(``mcq_layouts``) and their prompts (``mcq_prompt``). It imports only :mod:`medsft_lightning.hub`
(downloads and the offline defaults); every other stage may import it.
"""


def __getattr__(name: str):
    if name == "MedicalDataModule":  # where medsft <= 0.1 had it (medsft_lightning.data was one module)
        from medsft_lightning.data.datamodule import MedicalDataModule

        return MedicalDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
