"""The FASTKV attention backends.

Attention itself is vLLM's own on GPUs: ``FastKVAttentionBackend`` is vLLM's
FlashAttention backend (FlashAttention-3 on Hopper), so prefill and decode run the
same kernels as stock vLLM and, with compression off, produce the same tokens. On
CPUs, ``FastKVCPUAttentionBackend`` runs plain torch paged attention
(:mod:`vllm_fastkv.torch_paged_attention`). Both use vLLM's logical KV-cache shape
``(num_blocks, num_kv_heads, block_size, 2 * head_size)``, so the FastKV mechanisms
that read or rewrite the cache are shared by the two: the metadata builders add KV
retention's views (:mod:`vllm_fastkv.retention_metadata`) and the implementations
compress a completed prompt's KV after their attention (:mod:`vllm_fastkv.kv_compression`).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionLayer, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from vllm_fastkv import attention_lse
from vllm_fastkv.kv_compression import compress_prompt_kv
from vllm_fastkv.kv_quantization import PACKED_ATTR, attend_packed
from vllm_fastkv.registration import BACKEND_NAME
from vllm_fastkv.retention_metadata import COMPRESSION_ATTR, RetentionMetadataBuilderMixin
from vllm_fastkv.torch_paged_attention import paged_attention, split_kv_cache, write_paged_kv

logger = init_logger(f"vllm.{__name__}")


class _FastKVBackendTraits:
    """What FastKV supports on top of the attention it builds on."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        # FastKV scores a prompt's causal attention; encoders have nothing to compress.
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False


class _CompressAfterAttention:
    """Mix into an attention implementation: compress completed prompts after attending.

    The step that completes a prompt attends over the whole prompt as stock vLLM does;
    only then is this layer's prompt KV reduced to its retained entries (and, with
    low-bit KV, packed). Rows whose KV is packed get their output from the packed-KV
    attention, after vLLM's (which saw one token of them); in a batch of single-token
    decode rows the packed-KV attention computes every row and vLLM's is not called.
    Where vLLM's attention returns the queries' log-sum-exps (``lse_for_scoring``), the
    compressing step keeps them, and window scoring reads the keys once
    (:mod:`vllm_fastkv.attention_lse`).
    """

    head_size: int
    kv_cache_dtype: str
    scale: float
    lse_for_scoring: bool = False

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = getattr(attn_metadata, COMPRESSION_ATTR, None)
        packed = getattr(attn_metadata, PACKED_ATTR, None)
        lse = None
        if packed is None or not packed.attends_all:
            output, lse = self._vllm_attention(
                batch is not None and self.lse_for_scoring,
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )  # fmt: skip
        if batch is None and packed is None:
            return output
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        if is_quantized_kv_cache(self.kv_cache_dtype):
            key_cache = key_cache.view(current_platform.fp8_dtype())
            value_cache = value_cache.view(current_platform.fp8_dtype())
        if packed is not None:
            attend_packed(query, key_cache, value_cache, packed, output, scale=self.scale)
        if batch is not None:
            if self.lse_for_scoring:
                _log_scoring_pass(lse is not None)
            with batch.timer.span(query.device):
                compress_prompt_kv(
                    query, key_cache, value_cache, batch,
                    scale=self.scale, k_scale=layer._k_scale_float, attention_lse=lse,
                )  # fmt: skip
        return output

    def _vllm_attention(
        self, capture: bool, *args
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """vLLM's attention of the base class, with its log-sum-exps if ``capture`` (the
        capture is armed only then: decode steps run this per layer)."""
        if not capture:
            return super().forward(*args), None  # type: ignore[misc]
        with attention_lse.capture_lse() as captured:
            output = super().forward(*args)  # type: ignore[misc]
        return output, captured.lse


def _log_scoring_pass(from_attention: bool) -> None:
    """Say once per process which way window scoring gets its softmax normalisers."""
    if from_attention:
        logger.info_once("FASTKV: window scoring reads the keys once, with FlashAttention's "
                         "log-sum-exps as its normalisers")  # fmt: skip
    else:
        logger.warning_once("FASTKV: a compressing step's FlashAttention returned no "
                            "log-sum-exps (cascade or context-parallel attention); window "
                            "scoring computes them with a second pass over the keys")  # fmt: skip


class FastKVFlashAttentionMetadataBuilder(
    RetentionMetadataBuilderMixin, FlashAttentionMetadataBuilder
):
    """vLLM's FlashAttention metadata with KV retention's shifted views."""


class FastKVFlashAttentionImpl(_CompressAfterAttention, FlashAttentionImpl):
    """vLLM's FlashAttention, then KV compression of completed prompts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # FlashAttention's log-sum-exps are scoring's normalisers only where both see the
        # same logits: the whole causal prefix, unscaled by fp8 query or key scales, with
        # no soft cap, ALiBi bias or sink.
        self.lse_for_scoring = (
            self.sliding_window == (-1, -1)
            and not self.logits_soft_cap
            and self.alibi_slopes is None
            and self.sinks is None
            and not is_quantized_kv_cache(self.kv_cache_dtype)
            and attention_lse.install()
        )


class FastKVAttentionBackend(_FastKVBackendTraits, FlashAttentionBackend):
    """FASTKV on CUDA GPUs: vLLM's FlashAttention, plus FastKV's KV selection."""

    @staticmethod
    def get_impl_cls() -> type[FastKVFlashAttentionImpl]:
        return FastKVFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[FastKVFlashAttentionMetadataBuilder]:
        return FastKVFlashAttentionMetadataBuilder


class FastKVTritonMetadataBuilder(RetentionMetadataBuilderMixin, TritonAttentionMetadataBuilder):
    """vLLM's Triton attention metadata (used by the CPU path) with retention's views."""


class FastKVCPUAttentionBackend(_FastKVBackendTraits, TritonAttentionBackend):
    """FASTKV on CPUs: torch paged attention over the same cache layout."""

    supported_kv_cache_dtypes = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_impl_cls() -> type[FastKVCPUAttentionImpl]:
        return FastKVCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[FastKVTritonMetadataBuilder]:
        return FastKVTritonMetadataBuilder


class TorchPagedAttentionImpl(TritonAttentionImpl):
    """Torch attention and cache writes; metadata comes from the Triton builder."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if is_quantized_kv_cache(self.kv_cache_dtype):
            raise ValueError(
                "FASTKV on CPU supports unquantized KV caches only "
                f"(got --kv-cache-dtype {self.kv_cache_dtype})"
            )
        if self.alibi_slopes is not None:
            raise ValueError("FASTKV on CPU does not support ALiBi models")

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TritonAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("FASTKV on CPU does not fuse output quantization")
        if attn_metadata is None:
            # Profiling run: no cache yet.
            return output.fill_(0)
        num_tokens = attn_metadata.num_actual_tokens
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        return paged_attention(
            query[:num_tokens],
            key_cache,
            value_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            self.scale,
            output[:num_tokens],
            sliding_window_left=self.sliding_window[0],
            softcap=float(self.logits_soft_cap),
        )

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        write_paged_kv(key, value, key_cache, value_cache, slot_mapping)


class FastKVCPUAttentionImpl(_CompressAfterAttention, TorchPagedAttentionImpl):
    """Torch paged attention, then KV compression of completed prompts."""
