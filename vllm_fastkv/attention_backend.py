"""The FASTKV attention backend.

Attention itself is vLLM's Triton attention on GPUs (``TritonAttentionBackend``:
same paged layout, same kernels, CUDA-graph support) and plain torch on CPUs
(:mod:`vllm_fastkv.torch_paged_attention`), over one KV-cache layout on both, so
every FastKV mechanism that reads or rewrites the cache is shared by the two paths.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config.cache import CacheDType
from vllm.platforms import current_platform
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionLayer, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
)

from vllm_fastkv.registration import BACKEND_NAME
from vllm_fastkv.torch_paged_attention import paged_attention, split_kv_cache, write_paged_kv


class FastKVAttentionBackend(TritonAttentionBackend):
    """Decoder attention over vLLM's paged cache, with FastKV's KV selection."""

    supported_kv_cache_dtypes: ClassVar[list[CacheDType]] = [
        "auto",
        "float16",
        "bfloat16",
        "fp8",
        "fp8_e4m3",
        "fp8_e5m2",
    ]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[FastKVAttentionImpl]:
        return FastKVAttentionImpl

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


class FastKVAttentionImpl(TritonAttentionImpl):
    """Triton attention on CUDA; the torch path of the same layout elsewhere."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_torch_path = not current_platform.is_cuda_alike()
        if self.use_torch_path:
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
        if not self.use_torch_path:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )
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
        if not self.use_torch_path:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            return
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        write_paged_kv(key, value, key_cache, value_cache, slot_mapping)
