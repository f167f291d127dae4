"""vllm-fastkv: FastKV (token-selective propagation + KV retention) for vLLM.

Importing this package does not import vLLM, so the kernels in
:mod:`vllm_fastkv.kernels` can be used and benchmarked on machines without vLLM.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM ``general_plugins`` entry point: registers the FASTKV attention backend."""
    from vllm_fastkv.registration import register as _register

    _register()
