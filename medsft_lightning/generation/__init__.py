"""Generation: answers from a model, during training and after it.

This stage owns decoding (``decode``: batched, left-padded, KV-cached, every FSDP2 rank in lockstep), the
decoding settings and batched generation with the think/answer split (``generate``), how generation sees a
model that is being trained (``wrapped``: through a peft wrapper and FSDP2 units), the sample-generation
callback (``samples``), the generation metrics at validation (``metrics``), ``medsft predict``'s
resumable answer file (``predict``) and its vLLM engine (``vllm_engine``, driving the standalone
``vllm_worker`` in vLLM's own Python), a multi-turn chat (``chat``) and the same chat against an
OpenAI-compatible server (``endpoint``); for ``medsft eval``: option log-likelihoods (``mcq_loglik``), replies
with a thinking budget on any engine (``mcq_generate``), the answer letters (``mcq_answers``) and the
thinking-mode checks (``think_checks``). It may import :mod:`medsft_lightning.data` and
:mod:`medsft_lightning.hub`, never training: the LightningModule imports generation, not the other way.
"""
