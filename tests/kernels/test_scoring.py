"""window_scores: Triton (fused and two-pass) vs the reference, and the reference vs a naive
dense version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_fastkv.kernels import scoring, window_lse_ref, window_scores, window_scores_ref
from vllm_fastkv.kernels.scoring import FusedTuning

# A fused kernel whose schedule broke would spin forever (pass-2 jobs waiting for a flag
# nobody raises): fail instead.
pytestmark = pytest.mark.timeout(300)

# Relative error (||out - ref|| / ||ref||) allowed for each query dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Ragged lengths: T < window, T == window, one scored token, not a multiple of the block.
SEQ_LENS = [300, 5, 8, 9, 77, 129]
# Both implementations; the fused one also with one tile per item and no lag margin, the
# tightest schedule (pass-2 jobs right behind the longest unit's pass 1).
PATHS = {
    "fused": FusedTuning(),
    "fused_tight": FusedTuning(tiles_per_item=1, lag_per_program=0.0),
    "two_pass": None,
}


def naive_scores(query, paged, *, scale, window, pool_kernel, pooling, k_scale=1.0):
    """FastKV scores sequence by sequence: block-by-block dense gather, repeat_kv,
    F.softmax over position-masked logits, F pooling per query head, group sum."""
    num_seqs, _, num_q_heads, _ = query.shape
    _, block_size, num_kv_heads, _ = paged.key_cache.shape
    group = num_q_heads // num_kv_heads
    seq_lens = paged.seq_lens.tolist()
    out = torch.full((num_seqs, num_kv_heads, max(max(seq_lens) - window, 0)), float("-inf"))
    for s, seq_len in enumerate(seq_lens):
        num_scored = seq_len - window
        if num_scored <= 0:
            continue
        blocks = [
            paged.key_cache[paged.block_table[s, b]] for b in range(-(-seq_len // block_size))
        ]
        keys = torch.cat(blocks)[:seq_len].float().cpu() * k_scale  # [T, Hkv, d]
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, T, d]
        q = query[s].float().cpu().transpose(0, 1)  # [Hq, w, d]
        logits = q @ keys.transpose(1, 2) * scale
        q_pos = torch.arange(seq_len - window, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        probs = F.softmax(logits.masked_fill(k_pos > q_pos, float("-inf")), dim=-1)
        mass = probs[:, :, :num_scored].sum(dim=1, keepdim=True)  # [Hq, 1, n]
        if pooling == "avg":
            pooled = F.avg_pool1d(mass, pool_kernel, stride=1, padding=pool_kernel // 2)
        else:
            pooled = F.max_pool1d(mass, pool_kernel, stride=1, padding=pool_kernel // 2)
        out[s, :, :num_scored] = pooled[:, 0].view(num_kv_heads, group, num_scored).sum(dim=1)
    return out


def random_query(num_seqs, window, num_q_heads, head_dim, dtype, device):
    """Window queries as a non-contiguous view (heads and window swapped in memory)."""
    return torch.randn(num_seqs, num_q_heads, window, head_dim).to(dtype).to(device).transpose(1, 2)


def ragged_batch(paged_kv, device, seed):
    """``window_scores``' positional arguments for five fp32 prompts of 300, 9, 77, 129 and
    5 tokens (2 KV heads of 64, 4 query heads, block 16, window 8): prompts that end
    inside, at the start of or before a tile or split, and ones shorter than the window."""
    seq_lens = [300, 9, 77, 129, 5]
    paged = paged_kv(seq_lens, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
                     seed=seed)  # fmt: skip
    torch.manual_seed(seed)
    query = random_query(len(seq_lens), 8, 4, 64, torch.float32, device)
    return query, paged.key_cache, paged.block_table, paged.seq_lens


def assert_ragged_batch_scores(paged_kv, device, seed, pooling):
    """Two-pass scores of :func:`ragged_batch` match the reference, with the log-sum-exps
    given (the engine's path) and computed."""
    args = ragged_batch(paged_kv, device, seed=seed)
    kwargs = dict(scale=0.125, window=8, pooling=pooling)
    ref = window_scores_ref(*args, **kwargs)
    lse = window_lse_ref(*args, scale=0.125, window=8)
    assert_scores_match(window_scores(*args, lse=lse, **kwargs), ref, TOLERANCE[torch.float32])
    assert_scores_match(window_scores(*args, **kwargs), ref, TOLERANCE[torch.float32])


def assert_scores_match(out, ref, rel_tol):
    """Same -inf padding mask, no NaN, and ``||out - ref|| / ||ref|| <= rel_tol`` elsewhere."""
    out, ref = out.cpu(), ref.cpu()
    assert out.shape == ref.shape
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN entries"
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.equal(out[~finite], ref[~finite])  # all -inf
    err = (out[finite] - ref[finite]).norm() / ref[finite].norm()
    assert err <= rel_tol, f"relative error {err:.3g} > {rel_tol}"


@settings(max_examples=25, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    window=st.integers(1, 8),
    group=st.sampled_from([1, 2, 4]),
    num_kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([8, 32]),
    block_size=st.sampled_from([4, 16]),
    pool_kernel=st.sampled_from([1, 3, 7]),
    pooling=st.sampled_from(["avg", "max"]),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_naive(
    paged_kv,
    device,
    seq_lens,
    window,
    group,
    num_kv_heads,
    head_dim,
    block_size,
    pool_kernel,
    pooling,
    seed,
):
    paged = paged_kv(
        seq_lens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.float32,
        seed=seed,
    )
    torch.manual_seed(seed)
    query = random_query(
        len(seq_lens), window, group * num_kv_heads, head_dim, torch.float32, device
    )
    kwargs = dict(scale=head_dim**-0.5, window=window, pool_kernel=pool_kernel, pooling=pooling)
    ref = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    naive = naive_scores(query, paged, **kwargs)
    assert torch.equal(torch.isfinite(ref.cpu()), torch.isfinite(naive))
    torch.testing.assert_close(ref.cpu(), naive, rtol=1e-5, atol=1e-6)
    # The log-sum-exps window_lse_ref gives are the normalisers the scores use.
    lse = window_lse_ref(query, paged.key_cache, paged.block_table, paged.seq_lens,
                         scale=kwargs["scale"], window=window)  # fmt: skip
    given = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens,
                              lse=lse, **kwargs)  # fmt: skip
    torch.testing.assert_close(given, ref, rtol=1e-5, atol=1e-6)


# (group, head_dim, block_size, window, cache dtype, query dtype, pooling, pool_kernel)
CASES = [
    (1, 64, 16, 8, torch.float32, torch.float32, "avg", 7),
    (2, 128, 32, 8, torch.float16, torch.float16, "max", 7),
    (4, 64, 32, 8, torch.bfloat16, torch.bfloat16, "avg", 7),
    (4, 128, 16, 8, torch.bfloat16, torch.bfloat16, "max", 5),
    (8, 64, 16, 8, torch.float16, torch.float16, "avg", 3),
    (2, 64, 16, 3, torch.float32, torch.float32, "max", 1),
    (1, 128, 32, 16, torch.float16, torch.float16, "avg", 7),
    (2, 64, 16, 8, torch.float8_e4m3fn, torch.bfloat16, "max", 7),
]


@pytest.mark.parametrize("path", ["fused", "two_pass"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_matches_reference(case, path, paged_kv, device, poison_empty):
    group, head_dim, block_size, window, cache_dtype, query_dtype, pooling, pool_kernel = CASES[
        case
    ]
    num_kv_heads = 2
    paged = paged_kv(
        SEQ_LENS,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=cache_dtype,
        seed=100 + case,
    )
    torch.manual_seed(case)
    query = random_query(len(SEQ_LENS), window, group * num_kv_heads, head_dim, query_dtype, device)
    k_scale = 0.5 if cache_dtype == torch.float8_e4m3fn else 1.0
    kwargs = dict(
        scale=head_dim**-0.5,
        window=window,
        pool_kernel=pool_kernel,
        pooling=pooling,
        k_scale=k_scale,
    )
    out = window_scores(
        query, paged.key_cache, paged.block_table, paged.seq_lens, fused=PATHS[path], **kwargs
    )
    ref = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    assert out.dtype == torch.float32
    assert_scores_match(out, ref, TOLERANCE[query_dtype])


def flash_attention_layout(lse: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """``lse`` ``[n, w, heads]`` as FlashAttention returns it for a prefill of these
    sequences (``[heads, tokens]``, every other token's entry NaN) and gathered back as
    :func:`vllm_fastkv.kv_compression.compress_prompt_kv` does: a strided view."""
    num_seqs, window, heads = lse.shape
    ends = torch.tensor(seq_lens).cumsum(0)
    rows = ends[:, None] + torch.arange(-window, 0)
    flat = torch.full((heads, int(ends[-1])), float("nan"), device=lse.device)
    flat[:, rows] = lse.permute(2, 0, 1)
    return flat[:, rows.to(lse.device)].permute(1, 2, 0)


@pytest.mark.parametrize("case", [0, 2, 3, 5, 7])
def test_scores_from_given_lse(case, paged_kv, device, poison_empty):
    """With the window rows' log-sum-exps given (one key pass), the scores are the
    reference's; a shifted normaliser moves kernel and reference alike, so it is used."""
    group, head_dim, block_size, window, cache_dtype, query_dtype, pooling, pool_kernel = CASES[
        case
    ]
    seq_lens = [w if w >= window else window for w in SEQ_LENS]
    paged = paged_kv(seq_lens, num_kv_heads=2, head_dim=head_dim, block_size=block_size,
                     dtype=cache_dtype, seed=200 + case)  # fmt: skip
    torch.manual_seed(case)
    query = random_query(len(seq_lens), window, group * 2, head_dim, query_dtype, device)
    k_scale = 0.5 if cache_dtype == torch.float8_e4m3fn else 1.0
    kwargs = dict(scale=head_dim**-0.5, window=window, pool_kernel=pool_kernel,
                  pooling=pooling, k_scale=k_scale)  # fmt: skip
    args = (query, paged.key_cache, paged.block_table, paged.seq_lens)
    lse = window_lse_ref(*args, scale=head_dim**-0.5, window=window, k_scale=k_scale)
    shifted = lse + torch.rand(lse.shape, device=lse.device)
    refs = []
    for normaliser in (lse, shifted):
        out = window_scores(*args, lse=flash_attention_layout(normaliser, seq_lens), **kwargs)
        refs.append(window_scores_ref(*args, lse=normaliser, **kwargs))
        assert_scores_match(out, refs[-1], TOLERANCE[query_dtype])
    assert_scores_match(refs[0], window_scores_ref(*args, **kwargs), 1e-5)
    finite = torch.isfinite(refs[0])
    assert not torch.allclose(refs[0][finite], refs[1][finite], rtol=0.05)
    with pytest.raises(ValueError, match="lse and fused"):
        window_scores(*args, lse=lse, fused=FusedTuning(), **kwargs)
    with pytest.raises(ValueError, match="lse must be float32"):
        window_scores(*args, lse=lse[:, :-1], **kwargs)


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("pool_kernel", [33, 35, 63])
def test_wide_pooling(pool_kernel, pooling, paged_kv, device, poison_empty):
    """Pooling as wide as or wider than the fused kernel pools in registers (33): the
    two-pass kernels' scores are the reference's, with and without the log-sum-exps."""
    seq_lens = [300, 40, 129]
    paged = paged_kv(seq_lens, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
                     seed=13)  # fmt: skip
    torch.manual_seed(13)
    query = random_query(len(seq_lens), 8, 4, 64, torch.float32, device)
    args = (query, paged.key_cache, paged.block_table, paged.seq_lens)
    kwargs = dict(scale=0.125, window=8, pool_kernel=pool_kernel, pooling=pooling)
    ref = window_scores_ref(*args, **kwargs)
    lse = window_lse_ref(*args, scale=0.125, window=8)
    assert_scores_match(window_scores(*args, **kwargs), ref, TOLERANCE[torch.float32])
    assert_scores_match(window_scores(*args, lse=lse, **kwargs), ref, TOLERANCE[torch.float32])


def test_single_long_sequence_uses_many_key_splits(paged_kv, device, poison_empty):
    """Two-pass, one sequence and one KV head: every key tile is its own split in step 1."""
    paged = paged_kv([257], num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32, seed=7)
    torch.manual_seed(7)
    query = random_query(1, 8, 4, 64, torch.float32, device)
    kwargs = dict(scale=0.125, window=8)
    out = window_scores(
        query, paged.key_cache, paged.block_table, paged.seq_lens, fused=None, **kwargs
    )
    ref = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    assert_scores_match(out, ref, TOLERANCE[torch.float32])


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize(("programs", "max_tiles"), [(3, 64), (24, 64), (3, 4)])
def test_mass_kernel_walks_many_tiles_per_split(
    programs, max_tiles, pooling, paged_kv, device, poison_empty, monkeypatch
):
    """The mass kernel's pipelined loop: 16-key tiles, so a 300-token prompt has 19 of
    them; on CPU ``programs`` fixes the program count, giving one split per unit (a program
    walks every tile) or three (a ragged last split), and a cap of 4 tiles a program five
    (more than the program count asks for), with sequences that end inside, at the start
    of, or before a split (programs that load nothing)."""
    if device.type == "cuda":
        pytest.skip("the program count is fixed only under the CPU interpreter")
    monkeypatch.setattr(scoring, "_MASS_BLOCK_N", 16)
    monkeypatch.setattr(scoring, "_PROGRAMS_WITHOUT_GPU", programs)
    monkeypatch.setattr(scoring, "_MASS_MAX_TILES_PER_SPLIT", max_tiles)
    assert_ragged_batch_scores(paged_kv, device, 17, pooling)


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("block_pool", [16, 4096])
def test_pooling_kernel_program_width(block_pool, pooling, paged_kv, device, poison_empty,
                                      monkeypatch):  # fmt: skip
    """The pooling launch's tokens a program (a launch constant, 256, chosen on an H200
    over 256-4096): 16 puts program edges inside every pooling window's reach, 4096 gives
    each (sequence, KV head) one program wider than its row."""
    monkeypatch.setattr(scoring, "_BLOCK_POOL", block_pool)
    assert_ragged_batch_scores(paged_kv, device, 23, pooling)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_fused_many_items_and_merge_groups(pooling, paged_kv, device, poison_empty, monkeypatch):
    """Fused kernel with many items per unit (one tile each), merge groups of two items
    (so the log-sum-exp tree has both levels, with a ragged last group), the batch scanned
    two sequences at a time (a ragged last block too), the tightest lag, and units that are
    long, short, unscored or one chunk long in one batch."""
    monkeypatch.setattr(scoring, "_MERGE_BLOCK", 2)
    monkeypatch.setattr(scoring, "_SEQ_BLOCK", 2)
    seq_lens = [700, 3, 301, 58, 66]
    paged = paged_kv(
        seq_lens, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, seed=11
    )
    torch.manual_seed(11)
    query = random_query(len(seq_lens), 8, 4, 64, torch.float32, device)
    kwargs = dict(scale=0.125, window=8, pooling=pooling)
    out = window_scores(
        query, paged.key_cache, paged.block_table, paged.seq_lens, fused=PATHS["fused_tight"],
        **kwargs,
    )  # fmt: skip
    ref = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    assert_scores_match(out, ref, TOLERANCE[torch.float32])


@pytest.mark.parametrize("path", PATHS)
def test_host_max_seq_len(path, paged_kv, device, poison_empty):
    """``max_seq_len`` from the host gives the same scores; a larger one only adds ``-inf``
    columns (every entry written: the output comes from a NaN-poisoned ``torch.empty``)."""
    paged = paged_kv([90, 20], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
                     seed=5)  # fmt: skip
    torch.manual_seed(5)
    query = random_query(2, 8, 4, 64, torch.float32, device)
    kwargs = dict(scale=0.125, window=8, fused=PATHS[path])
    args = (query, paged.key_cache, paged.block_table, paged.seq_lens)
    ref = window_scores_ref(*args, scale=0.125, window=8)
    assert_scores_match(window_scores(*args, max_seq_len=90, **kwargs), ref, 1e-4)
    wider = window_scores(*args, max_seq_len=200, **kwargs)
    assert wider.shape == (2, 2, 192)
    assert_scores_match(wider[..., :82], ref, 1e-4)
    assert (wider[..., 82:] == float("-inf")).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_is_deterministic_without_device_syncs(paged_kv):
    """On the GPU: with ``max_seq_len`` from the host no call syncs, and the fused kernel's
    result does not depend on how its programs race (the merge order is fixed), even with
    one program per SM and no lag margin, where pass-2 jobs wait most."""
    seq_lens = [9000, 8, 1200, 3000, 65, 4096]  # 78 items of 116 tokens: two merge groups
    paged = paged_kv(
        seq_lens, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, seed=3
    )
    torch.manual_seed(3)
    query = random_query(len(seq_lens), 8, 32, 128, torch.bfloat16, "cuda")
    args = (query, paged.key_cache, paged.block_table, paged.seq_lens)
    kwargs = dict(scale=128**-0.5, window=8, max_seq_len=max(seq_lens))
    ref = window_scores_ref(*args, scale=128**-0.5, window=8)
    for tuning in (FusedTuning(), FusedTuning(programs_per_sm=1, lag_per_program=0.0)):
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [window_scores(*args, fused=tuning, **kwargs) for _ in range(20)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.equal(out, outs[0]) for out in outs)
        assert_scores_match(outs[0], ref, TOLERANCE[torch.bfloat16])


# Compiles a scoring kernel for an H100 (sm_90) with Triton's bundled ptxas, no GPU needed,
# at Llama-3.1-8B shapes; prints PTX. argv[1]: JSON of the kernel's name, pointer types,
# constexprs, 16-aligned arguments and compile options.
COMPILE_FOR_SM90 = """
import json
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_fastkv.kernels import scoring

spec = json.loads(sys.argv[1])
kernel = getattr(scoring, spec["kernel"])
constexprs = spec["constexprs"]
signature = {name: "constexpr" if name in constexprs else spec["pointers"].get(name, "i32")
             for name in kernel.arg_names}
signature |= {name: "fp32" for name in ("qk_scale", "lse_to_log2") if name in signature}
attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
         if name in spec["pointers"] or name in spec["aligned"]}
compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32), options=spec["options"])
assert compiled.asm["cubin"]
print(compiled.asm["ptx"])
"""
KEY_STRIDES = ["stride_qs", "stride_qw", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
               "head_dim"]  # fmt: skip


def compile_for_sm90(kernel: str, pointers: dict, constexprs: dict, aligned: list,
                     **options) -> str:  # fmt: skip
    """The sm_90 PTX of ``scoring.<kernel>`` (the interpreter is switched off for it)."""
    spec = dict(kernel=kernel, pointers=pointers, constexprs=constexprs, aligned=aligned,
                options=options)  # fmt: skip
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90, json.dumps(spec)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("key_dtype, pooling", [("bf16", "avg"), ("fp8e4nv", "max")])
def test_fused_kernel_compiles_for_sm90(key_dtype, pooling):
    """The GPU build of the fused kernel (register cap of 4 programs x 4 warps an SM),
    checked without a GPU (the interpreter runs the Python semantics only): ptxas accepts
    it under the register cap, the synchronisation is what the schedule relies on (one
    thread's acq_rel counts, acquire flag reads, release flag writes, L2-only reads of
    other programs' partials), and the key loops stay software-pipelined inside the job
    loop."""
    pointers = dict(query_ptr="*bf16", key_cache_ptr="*" + key_dtype, block_table_ptr="*i32",
                    seq_lens_ptr="*i32", partial_ptr="*fp32", sync_ptr="*i32", out_ptr="*fp32")
    constexprs = dict(PAGE_SIZE=16, G_PAD=4, W_PAD=8, D_PAD=128, SEQ_BLOCK=64, BLOCK_N=64,
                      BLOCK=64, POOL=7, POOL_PAD=8, IS_MAX=pooling == "max", MERGE_BLOCK=64,
                      FILL_BLOCK=1024, DOT_PRECISION="tf32", stride_qd=1, stride_kd=1)
    ptx = compile_for_sm90("_fused_scores_kernel", pointers, constexprs, KEY_STRIDES,
                           num_warps=4, num_stages=3, maxnreg=128)  # fmt: skip
    for instruction in (
        "atom.global.gpu.acq_rel.add",
        "ld.global.gpu.acquire",
        "atom.global.gpu.release.exch",
        "ld.global.cg",
        "cp.async",
    ):
        assert instruction in ptx, instruction


def test_pooling_launch_overlaps_mass_kernel_on_sm90():
    """With the log-sum-exps given, the two launches on Hopper: every mass program lets
    the dependent pooling launch start, and the pooling kernel reads no mass before
    ``griddepcontrol.wait`` (its only earlier load is the sequence length)."""
    mass_ptx = compile_for_sm90(
        "_window_mass_kernel",
        dict(query_ptr="*bf16", key_cache_ptr="*bf16", block_table_ptr="*i32",
             seq_lens_ptr="*i32", lse_ptr="*fp32", mass_ptr="*fp32"),
        dict(PAGE_SIZE=16, G_PAD=4, W_PAD=8, D_PAD=128, BLOCK_N=64, SUM_GROUP=True,
             DOT_PRECISION="tf32", NUM_STAGES=2, LAUNCH_POOLING=True, stride_qd=1, stride_kd=1),
        KEY_STRIDES, num_warps=4,
    )  # fmt: skip
    assert "griddepcontrol.launch_dependents" in mass_ptx
    assert "cp.async" in mass_ptx
    pool_ptx = compile_for_sm90(
        "_pool_group_kernel",
        dict(mass_ptr="*fp32", seq_lens_ptr="*i32", out_ptr="*fp32"),
        dict(POOL=7, IS_MAX=False, G_PAD=1, BLOCK=256, AFTER_MASS=True),
        ["stride_ms", "stride_mh", "stride_os", "stride_oh"], num_warps=4,
    )  # fmt: skip
    before_wait = pool_ptx.split("griddepcontrol.wait")
    assert len(before_wait) == 2
    assert before_wait[0].count("ld.global") == 1


def test_nothing_to_score(paged_kv, device):
    """Prompts no longer than the window give zero-width rows."""
    paged = paged_kv(
        [3, 8], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=1
    )
    query = random_query(2, 8, 4, 64, torch.float16, device)
    out = window_scores(
        query, paged.key_cache, paged.block_table, paged.seq_lens, scale=0.125, window=8
    )
    assert out.shape == (2, 2, 0)


@pytest.mark.parametrize(
    "change, message",
    [(dict(window=4), "window"), (dict(pool_kernel=4), "odd"), (dict(pooling="sum"), "pooling")],
)
@pytest.mark.parametrize("fn", [window_scores, window_scores_ref])
def test_rejects_bad_arguments(fn, change, message, paged_kv, device):
    paged = paged_kv([20], num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32, seed=2)
    query = random_query(1, 8, 2, 64, torch.float32, device)
    kwargs = dict(scale=0.125, window=8) | change
    with pytest.raises(ValueError, match=message):
        fn(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
