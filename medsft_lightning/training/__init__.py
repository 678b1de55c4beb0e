"""Training: the LightningModule and everything a training step and its checkpoints need.

This stage owns the LightningModule around Qwen3 (``module``), the chunked token-mean loss (``loss``), the
optimizer with Kahan summation for bf16 weights (``optim``), LoRA adapters (``lora``), FSDP2 sharding
(``sharding``), checkpoint files written atomically and read back safely (``checkpoints``), exact resume
(``resume``), the SwanLab logger (``loggers``) and the trained weights written as a Hugging Face folder
(``export``, also ``medsft export``). It may import :mod:`medsft_lightning.generation` (``predict_step``
and validation samples generate), :mod:`medsft_lightning.data` and :mod:`medsft_lightning.hub`.
"""
