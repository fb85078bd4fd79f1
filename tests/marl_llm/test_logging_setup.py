"""vLLM's expected "Failed to load weights" reload warnings are filtered; any other layer's still shows."""
import logging

import pytest

from marl_llm.logging_setup import quiet_vllm_reload_warnings


@pytest.mark.engine  # loads vLLM's model loader (seconds of imports)
def test_expected_reload_warnings_are_dropped(caplog, monkeypatch):
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "0")
    from vllm.model_executor.model_loader.reload import layerwise  # the logger vLLM's reload uses

    quiet_vllm_reload_warnings()
    quiet_vllm_reload_warnings()  # idempotent
    with caplog.at_level(logging.WARNING, logger=layerwise.logger.name):
        for layer in ("RotaryEmbedding", "ParallelLMHead", "QKVParallelLinear"):
            layerwise.logger.warning("%s: Failed to load weights", layer)
        layerwise.logger.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == layerwise.logger.name] == ["QKVParallelLinear: Failed to load weights", "something else"]
