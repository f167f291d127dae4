"""Start-up validation of FastKV settings against the engine configuration.

Runs inside vLLM's config construction (see :mod:`vllm_fastkv.registration`), in the
front-end process, so a bad setting stops ``vllm serve`` / ``LLM(...)`` before any
engine process is spawned. The resolved settings are written back into
``additional_config["fastkv"]``: engine-core and worker processes receive the config
by pickling and read exactly what was validated here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm_fastkv.config import ADDITIONAL_CONFIG_KEY, FastKVConfig, FastKVConfigError
from vllm_fastkv.propagation import SUPPORTED_ARCHITECTURES
from vllm_fastkv.request_overrides import install_request_overrides

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
        if settings.propagates and not _propagation_supported(model_config):
            logger.info(
                "FastKV token-selective propagation supports %s; %s keeps KV retention only.",
                ", ".join(sorted(SUPPORTED_ARCHITECTURES)), model_config.architectures,
            )
            settings = settings.model_copy(update={"tsp_rate": 1.0})
    if settings.quantizes:
        _check_low_bit(vllm_config, settings)
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = settings.model_dump()
    logger.info("FastKV settings: %s", settings.model_dump_json())
    if settings.compresses:
        _enable_retention(vllm_config)
        install_request_overrides()
    if settings.propagates:
        _check_propagation(vllm_config)
    return settings


def _check_low_bit(vllm_config: VllmConfig, settings: FastKVConfig) -> None:
    """Refuse low-bit KV where it would not pack: without retention, or for a cache page
    format the packed layout cannot use (checked again on the exact KV cache spec when
    the scheduler starts; the block size may only be settled later)."""
    if settings.retain_rate >= 1.0 and settings.mode == "proportional":
        raise FastKVConfigError(
            f"Invalid FastKV setting {settings.packed_bits_setting}: low-bit KV packs what KV "
            "retention keeps or evicts, so it needs fastkv.retain_rate < 1 or mode 'constant'"
        )
    model_config = vllm_config.model_config
    if model_config is None:
        return
    import torch

    from vllm_fastkv.kv_quantization import engine_layout

    cache_config = vllm_config.cache_config
    cache_dtype = str(cache_config.cache_dtype)
    element_size = 1 if cache_dtype.startswith("fp8") else (
        model_config.dtype.itemsize if cache_dtype == "auto"
        else getattr(torch, cache_dtype).itemsize
    )  # fmt: skip
    block_size = cache_config.block_size or DEFAULT_BLOCK_SIZE
    num_kv_heads = model_config.get_num_kv_heads(vllm_config.parallel_config)
    head_size = model_config.get_head_size()
    engine_layout(SimpleNamespace(
        block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size,
        page_size_bytes=2 * block_size * num_kv_heads * head_size * element_size,
    ), settings)  # fmt: skip


#: vLLM's block size on CUDA when none is given (the scheduler re-checks the real one).
DEFAULT_BLOCK_SIZE = 16


def _propagation_supported(model_config) -> bool:
    return bool(set(model_config.architectures or ()) & SUPPORTED_ARCHITECTURES)


def _check_propagation(vllm_config: VllmConfig) -> None:
    """Refuse what token-selective propagation cannot run with, naming the way out."""
    from vllm.config import CUDAGraphMode

    refused = {
        "pipeline parallelism": vllm_config.parallel_config.pipeline_parallel_size > 1,
        "LoRA": vllm_config.lora_config is not None,
        "KV connectors": vllm_config.kv_transfer_config is not None,
        "micro-batching": vllm_config.parallel_config.use_ubatching,
        # Full graphs of mixed batches would replay a capture of the unshortened forward.
        "cudagraph_mode=FULL": vllm_config.compilation_config.cudagraph_mode
        == CUDAGraphMode.FULL,
    }
    for what, present in refused.items():
        if present:
            raise FastKVConfigError(
                f"Invalid FastKV setting fastkv.tsp_rate: token-selective propagation does "
                f"not support {what} (set fastkv.tsp_rate=1.0 to keep KV retention only)"
            )
    # Steps that propagate run the decoder layers eagerly. With torch.compile vLLM turns
    # its CUDA kernels for these ops off in favour of inductor's fusions, which leaves
    # eager steps with unfused torch ops (several HBM passes each); keep the kernels on
    # unless the user chose otherwise. (RMSNorm is a vLLM IR op instead: the propagating
    # forward sets its dispatch priority, propagation.eager_ir_priority.)
    custom_ops = vllm_config.compilation_config.custom_ops
    for op in PROPAGATION_CUSTOM_OPS:
        if f"-{op}" not in custom_ops and f"+{op}" not in custom_ops:
            custom_ops.append(f"+{op}")


#: vLLM custom ops (activation, RoPE) that eager decoder layers should run fused.
PROPAGATION_CUSTOM_OPS = ("silu_and_mul", "rotary_embedding")


#: Schedulers with KV retention, for sync and async scheduling.
SCHEDULERS = {
    False: "vllm_fastkv.retention_scheduler.FastKVScheduler",
    True: "vllm_fastkv.retention_scheduler.FastKVAsyncScheduler",
}


def _enable_retention(vllm_config: VllmConfig) -> None:
    """Install the retention scheduler; turn off what retention cannot share blocks with."""
    scheduler_config = vllm_config.scheduler_config
    current = scheduler_config.scheduler_cls
    if current is not None and current not in SCHEDULERS.values():
        raise FastKVConfigError(
            f"Invalid FastKV setting: KV retention needs its own scheduler, but "
            f"scheduler_cls={current!r} is set (disable FastKV compression or drop it)"
        )
    if vllm_config.speculative_config is not None:
        raise FastKVConfigError(
            "Invalid FastKV setting: KV retention does not support speculative decoding yet "
            "(set fastkv.enabled=false or drop --speculative-config)"
        )
    scheduler_config.scheduler_cls = SCHEDULERS[bool(scheduler_config.async_scheduling)]
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        # Compaction rewrites a prompt's blocks: they must never be shared or reused.
        logger.info("FastKV KV retention is on: prefix caching disabled.")
        cache_config.enable_prefix_caching = False


def engine_fastkv_config(vllm_config: VllmConfig) -> FastKVConfig:
    """The settings validated at start-up, as seen from any engine process."""
    section = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if section is None:
        return validate_engine_config(vllm_config)
    return FastKVConfig.validated(section)
