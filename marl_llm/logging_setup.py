"""Log filters for engine messages that look alarming but are expected.

vLLM's layer-wise `reload_weights` (vllm/model_executor/model_loader/reload/layerwise.py) logs
"<Layer>: Failed to load weights" at WARNING for every layer that got no tensors on a reload
but holds tensors of its own. On every weight sync marl_llm sends the checkpoint's tensors
only, so two layers always match: `RotaryEmbedding` (its cos/sin cache is computed, never
loaded) and `ParallelLMHead` with tied embeddings (the shared weight arrives through the
embedding; marl_llm then re-packs the head, `WeightUpdateExtension._marl_llm_refresh_lm_head`).
vLLM puts their existing tensors back, and tests/marl_llm/test_weight_push.py shows that the pushed
weights are the ones served. The filter drops exactly those two lines; the same warning for
any other layer still shows.
"""
from __future__ import annotations

import logging

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
EXPECTED_ON_RELOAD = ("RotaryEmbedding", "ParallelLMHead")


class ExpectedReloadWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().endswith(": Failed to load weights"):
            return record.getMessage().split(":", 1)[0] not in EXPECTED_ON_RELOAD
        return True


def quiet_vllm_reload_warnings() -> None:
    """Install the filter (idempotent); call it in the process that runs the vLLM engine."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, ExpectedReloadWarnings) for f in logger.filters):
        logger.addFilter(ExpectedReloadWarnings())
