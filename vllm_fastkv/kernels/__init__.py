"""FastKV kernels on vLLM's paged KV cache: scoring, selection, compaction.

* :func:`window_scores`: per-KV-head token importance from the last ``window`` queries
  (Triton, reads the paged key cache directly).
* :func:`select_retained` / :func:`select_propagated`: per-head KV retention sets and the
  TSP token set (batched ``torch.topk``).
* :func:`compact_kv`: moves the retained K/V entries, in place, to consecutive slots from a
  per-sequence start (Triton); KV retention packs them against the end of the prompt so
  the leading blocks can be freed.
* :func:`pack_kv`: quantises groups of full-precision blocks to 2/4 bits into one page
  each (Triton; layout in :mod:`vllm_fastkv.packed_layout`), and
  :func:`packed_decode_attention` decodes over such pages plus full-precision blocks (and
  packs a decoding row's next page in the same launch).

Each has a plain-torch oracle with the same signature in
:mod:`vllm_fastkv.kernels.reference` (``*_ref``). This package imports torch and triton
only, never vLLM, so it can be tested and benchmarked without vLLM.
"""

from vllm_fastkv.kernels.compaction import compact_kv
from vllm_fastkv.kernels.packed_attention import packed_decode_attention
from vllm_fastkv.kernels.quantization import pack_kv
from vllm_fastkv.kernels.reference import (
    compact_kv_ref,
    pack_kv_ref,
    packed_decode_attention_ref,
    select_propagated_ref,
    select_retained_ref,
    unpack_pages_ref,
    window_lse_ref,
    window_scores_ref,
)
from vllm_fastkv.kernels.scoring import window_scores
from vllm_fastkv.kernels.selection import select_propagated, select_retained

__all__ = [
    "compact_kv",
    "compact_kv_ref",
    "pack_kv",
    "pack_kv_ref",
    "packed_decode_attention",
    "packed_decode_attention_ref",
    "select_propagated",
    "select_propagated_ref",
    "select_retained",
    "select_retained_ref",
    "unpack_pages_ref",
    "window_lse_ref",
    "window_scores",
    "window_scores_ref",
]
