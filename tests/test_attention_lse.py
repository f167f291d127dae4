"""attention_lse: FlashAttention's log-sum-exps reach window scoring only while armed.

On CPUs vLLM has no FlashAttention, so the wrapper is checked around a stand-in with the
same return convention; on a GPU, around vLLM's own FlashAttention over a paged cache,
whose log-sum-exps must be the normalisers window scoring computes itself.
"""

from __future__ import annotations

import pytest
import torch
from vllm.v1.attention.backends import flash_attn as flash_attn_module

from vllm_fastkv import attention_lse


def stand_in_varlen(q, k, v, *, out, return_softmax_lse=False, **_):
    """FlashAttention's return convention: ``out``, or ``(out, lse [heads, tokens])``."""
    out.copy_(q)
    lse = torch.arange(q.shape[1] * q.shape[0], dtype=torch.float32).view(q.shape[1], -1)
    return (out, lse) if return_softmax_lse else out


@pytest.fixture
def stand_in(monkeypatch):
    """vLLM's FlashAttention module with the stand-in as its entry point."""
    monkeypatch.setattr(flash_attn_module, "flash_attn_varlen_func", stand_in_varlen,
                        raising=False)  # fmt: skip
    assert attention_lse.install()
    return flash_attn_module


def test_capture_only_while_armed(stand_in):
    wrapped = stand_in.flash_attn_varlen_func
    assert wrapped is not stand_in_varlen
    assert attention_lse.install() and stand_in.flash_attn_varlen_func is wrapped  # once
    q = torch.randn(5, 3, 8)
    k = v = torch.empty(0)
    # Not armed: the call is vLLM's, untouched.
    assert wrapped(q=q, k=k, v=v, out=torch.empty_like(q)) is not None
    with attention_lse.capture_lse() as captured:
        out = wrapped(q=q, k=k, v=v, out=torch.empty_like(q))
    assert torch.equal(out, q)  # the output alone, as vLLM expects
    assert torch.equal(captured.lse, stand_in_varlen(q, k, v, out=out, return_softmax_lse=True)[1])
    # A caller that asks for the log-sum-exps itself (cascade, context parallelism) keeps
    # them; the capture stays empty and scoring computes its own.
    with attention_lse.capture_lse() as captured:
        result = wrapped(q=q, k=k, v=v, out=torch.empty_like(q), return_softmax_lse=True)
    assert isinstance(result, tuple) and captured.lse is None
    assert attention_lse._armed is None


class _FlashAttentionStandIn:
    """The base FASTKV's FlashAttention implementation extends, reduced to its call of
    vLLM's module-level entry point (looked up at call time, as vLLM's forward does)."""

    armed: list[bool]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *_):
        self.armed.append(attention_lse._armed is not None)
        return flash_attn_module.flash_attn_varlen_func(q=query, k=key, v=value, out=output)


@pytest.mark.parametrize("lse_for_scoring", [True, False])
@pytest.mark.parametrize("compressing", [True, False])
def test_compressing_step_hands_the_lse_to_compression(
    stand_in, monkeypatch, lse_for_scoring, compressing
):
    """FASTKV's attention arms the capture only in a step that compresses, with a backend
    whose log-sum-exps are scoring's normalisers, and passes what it caught on."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from vllm_fastkv import attention_backend
    from vllm_fastkv.retention_metadata import COMPRESSION_ATTR

    calls = []
    monkeypatch.setattr(attention_backend, "compress_prompt_kv",
                        lambda *args, **kwargs: calls.append(kwargs["attention_lse"]))  # fmt: skip

    class Impl(attention_backend._CompressAfterAttention, _FlashAttentionStandIn):
        head_size, kv_cache_dtype, scale = 8, "auto", 1.0

    impl = Impl()
    impl.lse_for_scoring, impl.armed = lse_for_scoring, []
    batch = SimpleNamespace(timer=SimpleNamespace(span=lambda device: nullcontext()))
    metadata = SimpleNamespace(**({COMPRESSION_ATTR: batch} if compressing else {}))
    query = torch.randn(5, 3, 8)
    impl.forward(SimpleNamespace(_k_scale_float=1.0), query, query, query,
                 torch.zeros(2, 1, 16, 16), metadata, torch.empty_like(query))  # fmt: skip
    # Armed around vLLM's call only when it can pay off (decode steps run this per layer).
    assert impl.armed == [compressing and lse_for_scoring]
    if not compressing:
        assert calls == []
        return
    (lse,) = calls
    if lse_for_scoring:
        assert torch.equal(lse, stand_in_varlen(query, None, None, out=query.clone(),
                                                return_softmax_lse=True)[1])  # fmt: skip
    else:
        assert lse is None
    assert attention_lse._armed is None


def test_install_without_flash_attention(monkeypatch):
    monkeypatch.delattr(flash_attn_module, "flash_attn_varlen_func", raising=False)
    assert not attention_lse.install()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_lse_are_the_scoring_normalisers():
    """vLLM's FlashAttention over a paged prefill of ragged prompts (Llama-3.1-8B heads,
    bf16): the captured log-sum-exps of the window rows are window_lse_ref's, and scores
    from them (one key pass) are the reference's."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    from tests.kernels.conftest import build_paged_kv
    from vllm_fastkv.kernels import window_lse_ref, window_scores, window_scores_ref

    seq_lens, window, heads, kv_heads, head_dim = [4099, 700, 9, 16384], 8, 32, 8, 128
    paged = build_paged_kv(seq_lens, num_kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                           dtype=torch.bfloat16, seed=0)  # fmt: skip
    key_cache, value_cache = paged.key_cache.contiguous(), paged.value_cache.contiguous()
    torch.manual_seed(0)
    query = torch.randn(sum(seq_lens), heads, head_dim, device="cuda").to(torch.bfloat16)
    starts = torch.tensor([0, *seq_lens]).cumsum(0).to(torch.int32).cuda()
    scale = head_dim**-0.5
    assert attention_lse.install()
    with attention_lse.capture_lse() as captured:
        flash_attn_module.flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache, out=torch.empty_like(query),
            cu_seqlens_q=starts, max_seqlen_q=max(seq_lens), seqused_k=paged.seq_lens,
            max_seqlen_k=max(seq_lens), softmax_scale=scale, causal=True,
            block_table=paged.block_table, fa_version=get_flash_attn_version(),
        )  # fmt: skip
    rows = starts[1:, None].long() + torch.arange(-window, 0, device="cuda")
    lse = captured.lse[:, rows].permute(1, 2, 0)
    window_queries = query[rows]
    args = (window_queries, key_cache, paged.block_table, paged.seq_lens)
    torch.testing.assert_close(lse, window_lse_ref(*args, scale=scale, window=window),
                               rtol=0, atol=2e-3)  # fmt: skip
    out = window_scores(*args, scale=scale, window=window, lse=lse, max_seq_len=max(seq_lens))
    ref = window_scores_ref(*args, scale=scale, window=window)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    err = (out[finite] - ref[finite]).norm() / ref[finite].norm()
    assert err < 1e-2, f"relative error {err:.3g}"
