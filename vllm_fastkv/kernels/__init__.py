"""FastKV kernels on vLLM's paged KV cache: scoring, selection, compaction.

* :func:`window_scores`: per-KV-head token importance from the last ``window`` queries
  (Triton, reads the paged key cache directly).
* :func:`select_retained` / :func:`select_propagated`: per-head KV retention sets and the
  TSP token set (batched ``torch.topk``).
* :func:`compact_kv`: moves the retained K/V entries, in place, to consecutive slots from a
  per-sequence start (Triton); KV retention packs them against the end of the prompt so
  the leading blocks can be freed.

Each has a plain-torch oracle with the same signature in
:mod:`vllm_fastkv.kernels.reference` (``*_ref``). This package imports torch and triton
only, never vLLM, so it can be tested and benchmarked without vLLM.
"""

from vllm_fastkv.kernels.compaction import compact_kv
from vllm_fastkv.kernels.reference import (
    compact_kv_ref,
    select_propagated_ref,
    select_retained_ref,
    window_scores_ref,
)
from vllm_fastkv.kernels.scoring import window_scores
from vllm_fastkv.kernels.selection import select_propagated, select_retained

__all__ = [
    "compact_kv",
    "compact_kv_ref",
    "select_propagated",
    "select_propagated_ref",
    "select_retained",
    "select_retained_ref",
    "window_scores",
    "window_scores_ref",
]
