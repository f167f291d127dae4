"""FASTKV is a real member of vLLM's backend enum, in every process that needs it."""

from __future__ import annotations

import pickle
import subprocess
import sys

import vllm_fastkv


def test_fastkv_is_an_enum_member_and_resolves_to_our_backend():
    vllm_fastkv.register()
    vllm_fastkv.register()  # idempotent: vLLM loads plugins in several places
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_fastkv.attention_backend import FastKVAttentionBackend

    member = AttentionBackendEnum["FASTKV"]
    assert member is AttentionBackendEnum.FASTKV
    assert "FASTKV" in AttentionBackendEnum.__members__
    assert member.get_class() is FastKVAttentionBackend
    assert AttentionConfig(backend="fastkv").backend is member
    assert AttentionBackendEnum["TRITON_ATTN"].name == "TRITON_ATTN"  # others untouched
    assert (
        pickle.loads(pickle.dumps(AttentionBackendEnum.FLASH_ATTN))
        is AttentionBackendEnum.FLASH_ATTN
    )


def test_member_unpickles_in_a_process_that_never_loaded_plugins():
    """A spawned engine process unpickles its config before it loads plugins."""
    vllm_fastkv.register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    payload = pickle.dumps({"backend": AttentionBackendEnum.FASTKV}).hex()
    code = (
        "import pickle, sys; "
        f"cfg = pickle.loads(bytes.fromhex('{payload}')); "
        "print(cfg['backend'].name, cfg['backend'].get_class().get_name())"
    )
    env = {"VLLM_PLUGINS": ""}  # vLLM loads no plugin in this process
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "FASTKV FASTKV"


def test_cpu_platform_honours_an_explicit_fastkv_request():
    vllm_fastkv.register()
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    selector = AttentionSelectorConfig(
        head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=16
    )
    path = current_platform.get_attn_backend_cls(AttentionBackendEnum.FASTKV, selector)
    assert path == "vllm_fastkv.attention_backend.FastKVCPUAttentionBackend"
    stock = current_platform.get_attn_backend_cls(None, selector)
    assert stock == AttentionBackendEnum.CPU_ATTN.get_path()
