"""Start-up validation of FastKV settings against the engine configuration.

Runs inside vLLM's config construction (see :mod:`vllm_fastkv.registration`), in the
front-end process, so a bad setting stops ``vllm serve`` / ``LLM(...)`` before any
engine process is spawned. The resolved settings are written back into
``additional_config["fastkv"]``: engine-core and worker processes receive the config
by pickling and read exactly what was validated here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm_fastkv import __version__
from vllm_fastkv.config import ADDITIONAL_CONFIG_KEY, FastKVConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(f"vllm.{__name__}")


def validate_engine_config(vllm_config: VllmConfig) -> FastKVConfig:
    """Validate and resolve the FastKV settings of an engine; raises FastKVConfigError."""
    if not isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config = {}
    settings = FastKVConfig.from_sources(vllm_config.additional_config)
    model_config = vllm_config.model_config
    if model_config is not None:
        num_layers = model_config.get_total_num_hidden_layers()
        settings = settings.resolved_for_model(num_layers)
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = settings.model_dump()
    logger.info("FastKV settings: %s", settings.model_dump_json())
    if settings.compresses:
        logger.warning(
            "FastKV KV retention and token-selective propagation are not implemented in "
            "vllm-fastkv %s yet: serving with the full KV cache.",
            __version__,
        )
    return settings


def engine_fastkv_config(vllm_config: VllmConfig) -> FastKVConfig:
    """The settings validated at start-up, as seen from any engine process."""
    section = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if section is None:
        return validate_engine_config(vllm_config)
    return FastKVConfig.validated(section)
