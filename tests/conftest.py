"""Shared fixtures: tiny models generated at test time (no model hub anywhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on a CPU-only machine: bind to loopback (distributed init hangs on a host
# address otherwise) and give the KV cache a small fixed size.
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama (GQA 4:2, head_dim 32) with a trained BPE tokenizer."""
    from vllm_fastkv.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Qwen2 (q/k/v biases, GQA 4:2) with a trained BPE tokenizer."""
    from vllm_fastkv.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1)
