"""Tools: the user's commands around a run that are not the run itself.

This wing owns ``medsft memory`` (the per-device memory and disk estimate of a config: ``memory``'s
formulas, ``memory_settings`` reading the config, ``memory_report`` printing the table) and ``medsft
preview`` (one encoded row with its label mask, and the length statistics; ``preview``). Tools sit on top
of the stages and may import any of them (:mod:`~medsft_lightning.training`,
:mod:`~medsft_lightning.generation`, :mod:`~medsft_lightning.data`, :mod:`~medsft_lightning.hub`); only
:mod:`medsft_lightning.cli` imports tools.
"""
