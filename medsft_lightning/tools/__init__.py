"""Tools: the user's commands around a run that are not the run itself.

This wing owns ``medsft memory`` (the per-device memory and disk estimate of a config: ``memory``'s
formulas, ``memory_settings`` reading the config, ``memory_report`` printing the table), ``medsft preview``
(one encoded row with its label mask, and the length statistics; ``preview``), and the commands that use a
trained model: ``medsft chat`` (a terminal chat; ``chat``), ``medsft webchat`` (a local Gradio page, optionally
base and fine-tuned side by side; ``webchat``) and ``medsft compare`` (base vs fine-tuned on the same
questions, with an offline HTML report; ``compare``, ``compare_metrics``, ``report_plot``) and ``medsft eval``
(medical benchmarks and thinking modes, base vs tuned; ``eval``, ``eval_run``, ``eval_stats``, ``eval_io``,
``eval_report``), all loading
whatever MODEL the user names through ``models``. Tools sit on top of the stages and may import any of them
(:mod:`~medsft_lightning.training`, :mod:`~medsft_lightning.generation`, :mod:`~medsft_lightning.data`,
:mod:`~medsft_lightning.hub`); only :mod:`medsft_lightning.cli` reaches tools (by ``EXTRA_COMMANDS``).
"""
