"""Plain-torch FastKV reference: the accuracy oracle for the vLLM implementation.

* :mod:`~vllm_fastkv.reference.scoring`: scoring and selection math on dense tensors.
* :mod:`~vllm_fastkv.reference.fastkv`: layer-by-layer prefill with KV retention and
  token-selective propagation, plus greedy decoding, over HF transformers models.
* :mod:`~vllm_fastkv.reference.lowbit`: low-bit storage of the retained KV (packed KV's
  oracle), and of what retention evicts (mixed precision, :func:`keep_evicted_low_bit`).
* :mod:`~vllm_fastkv.reference.tasks`: seeded long-context retrieval tasks and scoring.

Importing this package needs torch only; transformers models are passed in.
"""

from vllm_fastkv.reference.fastkv import (
    LayerKV,
    Policy,
    PrefillResult,
    fastkv_prefill,
    forced_decode_logits,
    generate,
    greedy_decode,
    resolve_tsp_layer,
)
from vllm_fastkv.reference.lowbit import LowBitStore, keep_evicted_low_bit

__all__ = [
    "LayerKV",
    "LowBitStore",
    "Policy",
    "PrefillResult",
    "fastkv_prefill",
    "forced_decode_logits",
    "generate",
    "greedy_decode",
    "keep_evicted_low_bit",
    "resolve_tsp_layer",
]
