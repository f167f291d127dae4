"""Kernel-test setup: Triton's CPU interpreter when there is no GPU, and paged-cache builders.

Triton picks the interpreter when its own modules and each kernel are *defined*, so
``TRITON_INTERPRET=1`` must be set before anything imports triton; it is set here at
import time and stays set for the session. If triton was imported earlier (a test module
collected before this directory imported vLLM, say), setting it now would be too late, so
that is reported plainly. On a machine with a GPU nothing is changed and the same tests
run the compiled kernels on it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        raise RuntimeError(
            "triton was imported before tests/kernels/conftest.py could select its CPU "
            "interpreter: set TRITON_INTERPRET=1 earlier (environment or tests/conftest.py)"
        )
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class PagedKV:
    """A vLLM-layout paged KV cache holding a batch of sequences."""

    kv_cache: torch.Tensor  # the allocation: [num_blocks, num_kv_heads, block_size, 2 * head_dim]
    key_cache: torch.Tensor  # view [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor  # view, same shape
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks + 1], unused entries 0
    seq_lens: torch.Tensor  # int32 [num_seqs]


def build_paged_kv(
    seq_lens: list[int],
    *,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    spare_blocks: int = 3,
) -> PagedKV:
    """Random K/V for ``seq_lens`` in shuffled blocks (plus unowned spare blocks).

    The cache is built as vLLM's Triton backend allocates it and split into the strided,
    non-contiguous K and V views the kernels receive.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-t // block_size) for t in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    kv_cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_dim, generator=gen)
    kv_cache = (2 * kv_cache).to(dtype).to(DEVICE)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_dim, dim=-1)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_table = torch.zeros(len(seq_lens), max(blocks_per_seq, default=0) + 1, dtype=torch.int32)
    for s, n in enumerate(blocks_per_seq):
        block_table[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    return PagedKV(
        kv_cache,
        key_cache,
        value_cache,
        block_table.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
    )


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where test tensors live: the GPU if there is one, else the CPU (interpreter)."""
    return DEVICE


@pytest.fixture(scope="session")
def paged_kv() -> Callable[..., PagedKV]:
    """The :func:`build_paged_kv` builder (session-scoped: usable under hypothesis)."""
    return build_paged_kv


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``torch.empty`` return NaN (floats) or 0x55 bytes (integers), so any output or
    scratch entry a kernel fails to write, or reads before writing, shows up."""
    real_empty = torch.empty

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else 0x55)

    monkeypatch.setattr(torch, "empty", poisoned)
    yield
