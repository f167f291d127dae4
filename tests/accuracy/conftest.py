"""The real model of the accuracy tests, converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.accuracy.real_model import build_smollm2

    return build_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.accuracy.real_model import build_retriever

    return build_retriever(tmp_path_factory.mktemp("retriever"))
