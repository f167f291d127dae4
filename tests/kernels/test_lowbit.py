"""Low-bit KV: the packed layout, packing (Triton vs reference, bit for bit), its
round-trip error, and decode attention over packed pages (Triton vs reference vs dense)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_fastkv.kernels import (
    pack_kv,
    pack_kv_ref,
    packed_decode_attention,
    packed_decode_attention_ref,
    unpack_pages_ref,
)
from vllm_fastkv.kernels.quantization import check_kernel_layout
from vllm_fastkv.packed_layout import LowBitLayout, page_views
from vllm_fastkv.reference.quantization import dequantize_groups_ref, quantize_groups_ref

# Relative error of attention outputs by cache dtype (fp32 products vs bf16/fp16 dots).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.mark.parametrize(
    ("bits", "block_size", "dtype", "per_page"),
    [(2, 16, torch.bfloat16, 4), (4, 16, torch.bfloat16, 2), (2, 32, torch.bfloat16, 5),
     (4, 32, torch.float16, 3), (2, 16, torch.float32, 9)],
)  # fmt: skip
def test_layout_of_llama_8b_pages(bits, block_size, dtype, per_page):
    """Blocks per page for Llama-3.1-8B heads (8 x 128), value groups of 32 channels."""
    cache = torch.empty(2, block_size, 8, 128, dtype=dtype)
    layout = LowBitLayout.for_cache(cache, bits, 32)
    assert layout.blocks_per_page == per_page
    assert layout.blocks_per_page * layout.subblock_bytes <= layout.page_bytes
    # Regions tile each head's bytes exactly (offsets in fp16 halves).
    key_scale, key_min, value_scale, value_min = layout.scale_offsets()
    assert layout.head_bytes // 2 == value_min + block_size * layout.value_groups


def test_layout_refuses_what_saves_nothing_or_misaligns():
    with pytest.raises(ValueError, match="saves no memory"):
        LowBitLayout.for_cache(torch.empty(2, 16, 8, 128, dtype=torch.float8_e4m3fn), 4, 32)
    with pytest.raises(ValueError, match="kv_bits"):
        LowBitLayout.for_cache(torch.empty(2, 16, 8, 128, dtype=torch.bfloat16), 3, 32)
    with pytest.raises(ValueError, match="kv_group_size"):
        LowBitLayout.for_cache(torch.empty(2, 16, 8, 128, dtype=torch.bfloat16), 2, 48)
    # The layout holds 8-channel groups at 2 bits; the kernels, which take one scale for
    # a word's 16 codes, refuse them.
    narrow = LowBitLayout.for_cache(torch.empty(2, 16, 8, 128, dtype=torch.bfloat16), 2, 8)
    with pytest.raises(ValueError, match="multiple of 16 at 2 bits"):
        check_kernel_layout(narrow)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    rows=st.integers(1, 5),
    size=st.sampled_from([4, 8, 16, 32]),
    spread=st.floats(1e-3, 1e3),
    constant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantization_round_trip_error(bits, rows, size, spread, constant, seed):
    """Every value comes back within half a quantisation step (plus fp16 rounding of the
    scale and minimum); constant groups come back exactly up to fp16."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, size, generator=gen) * spread + spread * 3
    if constant:
        x[0] = x[0, 0]
    codes, scale, minimum = quantize_groups_ref(x, bits, dim=1)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    back = dequantize_groups_ref(codes, scale, minimum)
    step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / (2**bits - 1)
    fp16 = 2**-10 * (x.abs().amax(1, keepdim=True) + step * 2**bits)
    assert ((back - x).abs() <= step / 2 + 2 * fp16).all()


def _groups(paged, per_page: int, seed: int) -> torch.Tensor:
    """Disjoint groups of ``per_page`` blocks in table order (as retention folds them)."""
    gen = torch.Generator().manual_seed(seed)
    block_size = paged.key_cache.shape[1]
    owned = [row[: -(-int(t) // block_size)] for row, t in zip(paged.block_table, paged.seq_lens)]
    blocks = torch.cat(owned).cpu()
    blocks = blocks[torch.randperm(blocks.numel(), generator=gen)]
    count = blocks.numel() // per_page
    return blocks[: count * per_page].view(count, per_page).to(paged.block_table.device)


CASES = [
    # bits, num_kv_heads, head_dim, block_size, value_group, dtype
    (2, 2, 64, 16, 32, torch.float32),
    (4, 2, 64, 16, 32, torch.float32),
    (2, 1, 128, 32, 32, torch.bfloat16),
    (4, 4, 64, 16, 16, torch.float16),
    (2, 2, 128, 16, 128, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}bit-h{c[1]}-d{c[2]}-b{c[3]}")
def test_pack_matches_reference_bit_for_bit(case, paged_kv, device):
    bits, heads, head_dim, block_size, value_group, dtype = case
    paged = paged_kv([block_size * 9, block_size * 5], num_kv_heads=heads, head_dim=head_dim,
                     block_size=block_size, dtype=dtype, seed=1)  # fmt: skip
    layout = LowBitLayout.for_cache(paged.key_cache, bits, value_group)
    groups = _groups(paged, layout.blocks_per_page, seed=2)
    original = paged.kv_cache.clone()
    ref_cache = paged.kv_cache.clone()
    ref_k, ref_v = ref_cache.transpose(1, 2).split(head_dim, dim=-1)
    pack_kv(paged.key_cache, paged.value_cache, groups, layout)
    pack_kv_ref(ref_k, ref_v, groups, layout)
    used = layout.blocks_per_page * layout.subblock_bytes // 4
    words, ref_words = page_views(paged.key_cache)[0], page_views(ref_k)[0]
    pages = groups[:, 0].long()
    assert torch.equal(words[pages, :used], ref_words[pages, :used])
    # Blocks that are no group's page keep their bytes.
    others = torch.ones(paged.kv_cache.shape[0], dtype=torch.bool, device=device)
    others[pages] = False
    assert torch.equal(paged.kv_cache[others].view(torch.uint8),
                       original[others].view(torch.uint8))  # fmt: skip
    # And the packed pages decode to the original blocks, within the quantisation error.
    keys, values = unpack_pages_ref(paged.key_cache, groups[:, 0], layout)
    orig_k, orig_v = original.transpose(1, 2).split(head_dim, dim=-1)
    src = groups.long()
    for packed, orig in ((keys, orig_k), (values, orig_v)):
        expected = orig[src].float().flatten(1, 2)  # [n, R * block, heads, dim]
        err = (packed - expected).abs().max() / expected.abs().max()
        assert err < {2: 0.35, 4: 0.08}[bits]


def _pack_rows(paged, layout, pages_per_row: list[int]) -> torch.Tensor:
    """Pack the first ``pages_per_row[i] * R`` blocks of each row (as the engine does),
    returning the packed-page counts."""
    per_page = layout.blocks_per_page
    groups = [
        paged.block_table[i, k * per_page : (k + 1) * per_page]
        for i, n in enumerate(pages_per_row)
        for k in range(n)
    ]
    if groups:
        pack_kv(paged.key_cache, paged.value_cache, torch.stack(groups), layout)
    return torch.tensor(pages_per_row, dtype=torch.int32, device=paged.block_table.device)


def _dense_attention(query, keys, values, scale):
    """fp32 attention of one query [heads, dim] over [seq, kv_heads, dim]."""
    group = query.shape[0] // keys.shape[1]
    k = keys.transpose(0, 1).repeat_interleave(group, 0)
    v = values.transpose(0, 1).repeat_interleave(group, 0)
    probs = torch.softmax(torch.einsum("hd,hsd->hs", query.float(), k) * scale, dim=-1)
    return torch.einsum("hs,hsd->hd", probs, v)


@pytest.mark.parametrize(("splits", "tile_blocks", "num_warps", "num_stages"),
                         [(None, None, None, None), (1, 4, 8, 2), (7, 2, 2, 4)],
                         ids=lambda v: f"{v}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}bit-h{c[1]}-d{c[2]}-b{c[3]}")
def test_packed_decode_attention(case, splits, tile_blocks, num_warps, num_stages, paged_kv,
                                 device, poison_empty):
    """Triton vs reference over rows with 0, 1 or 2 packed pages and ragged full-precision
    tails (a row of 0 pages: full-precision blocks only), with the tiles split
    over the default, 1 or 7 programs (more splits than a row has tiles: some splits find
    none) and tiles of the default (the page, up to 4 blocks), 4 or 2 blocks (pages of 2, 5
    or 9 blocks: tile blocks past a page's end masked), at the default, 8 or 2 warps and the
    default (1), 2 or 4 pipeline stages (on a GPU: other layouts and schedules of the same
    tiles); rows marked -1 and a padding row without a query keep what the output held, a
    row with a query but no visible token gets zeros; a second launch with the same
    arrival counts (left zero by the first) gives the same output; the reference itself
    equals dense attention over the dequantised pages plus the full-precision tokens."""
    bits, heads, head_dim, block_size, value_group, dtype = case
    layout_probe = LowBitLayout.for_cache(
        torch.empty(1, block_size, heads, head_dim, dtype=dtype), bits, value_group
    )
    page_tokens = layout_probe.page_tokens
    seq_lens = [2 * page_tokens + 5, page_tokens + block_size, 37, page_tokens + 1,
                9 * block_size + 3, 0, 0]
    pages_per_row = [2, 1, -1, 1, 0, 0, 0]
    paged = paged_kv(seq_lens, num_kv_heads=heads, head_dim=head_dim, block_size=block_size,
                     dtype=dtype, seed=7)  # fmt: skip
    layout = LowBitLayout.for_cache(paged.key_cache, bits, value_group)
    packed = _pack_rows(paged, layout, pages_per_row)
    num_q_heads = 2 * heads
    gen = torch.Generator().manual_seed(8)
    # Row i's query sits at token 2 * i (other tokens belong to nobody).
    query = torch.randn(2 * len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    query = query.to(device)
    # The last row is padding: no query (its start is the end of the batch's tokens).
    qsl = torch.arange(0, 2 * len(seq_lens) + 1, 2, dtype=torch.int32, device=device)
    qsl[-1] = qsl[-2]
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    args = (query, paged.key_cache, paged.value_cache, paged.block_table, qsl, lens, packed)
    marker = torch.full_like(query, 7.0)
    # The arrival counts: one buffer for two launches (as layers share it), left zero by
    # each.
    arrivals = torch.zeros(len(seq_lens) * (heads + 1) + 3, dtype=torch.int32, device=device)
    options = dict(scale=scale, layout=layout, splits=splits, tile_blocks=tile_blocks,
                   num_warps=num_warps, num_stages=num_stages, arrivals=arrivals)
    out = packed_decode_attention(*args, marker.clone(), **options)
    assert (arrivals == 0).all()
    assert torch.equal(packed_decode_attention(*args, marker.clone(), **options), out)
    assert (arrivals == 0).all()
    ref = packed_decode_attention_ref(*args, marker.clone(), scale=scale, layout=layout)
    rows = [0, 2, 6, 8]
    for untouched in (4, 12):  # row 2 (marked -1) and row 6 (padding)
        assert (out[untouched] == 7.0).all() and (ref[untouched] == 7.0).all()
    assert (out[10] == 0).all() and (ref[10] == 0).all()  # row 5: nothing to attend
    err = (out[rows].float() - ref[rows].float()).norm() / ref[rows].float().norm()
    assert err < TOLERANCE[dtype], err
    # Reference vs dense attention over what the pages and blocks hold.
    for i in (0, 1, 4):
        row = paged.block_table[i].long()
        n = pages_per_row[i]
        keys, values = unpack_pages_ref(paged.key_cache, row[: n * layout.blocks_per_page :
                                                               layout.blocks_per_page], layout)
        rest = torch.arange(n * page_tokens, seq_lens[i], device=device)
        blocks, slots = row[rest // block_size], rest % block_size
        keys = torch.cat([keys.flatten(0, 1), paged.key_cache[blocks, slots].float()])
        values = torch.cat([values.flatten(0, 1), paged.value_cache[blocks, slots].float()])
        dense = _dense_attention(query[2 * i], keys, values, scale)
        assert torch.allclose(ref[2 * i].float(), dense.to(dtype).float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("splits", [None, 1, 7], ids=lambda v: f"splits{v}")
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{c[0]}bit-h{c[1]}-d{c[2]}-b{c[3]}")
def test_decode_attention_packs_pages_after_attending(case, splits, paged_kv, device,
                                                      poison_empty):
    """``pack_pages``: the launch attends as without it, then packs each asking row's page
    (its R blocks from column ``p * R``) into the page's first block, bit for bit as the
    reference packs it, and leaves every other byte of the cache alone: rows that pack
    after attending over packed pages and over full-precision blocks only, a row left to
    vLLM's attention (-1) that still packs, rows that do not pack, and a padding row.
    Splits: the default, 1 (one program does all R blocks of its KV head), 7 (more
    programs than blocks: some quantise none). The scratch pages start poisoned, and the
    arrival counts are left zero."""
    bits, heads, head_dim, block_size, value_group, dtype = case
    layout_probe = LowBitLayout.for_cache(
        torch.empty(1, block_size, heads, head_dim, dtype=dtype), bits, value_group
    )
    page_tokens = layout_probe.page_tokens
    seq_lens = [2 * page_tokens + 5, page_tokens + block_size, page_tokens + 3, 40, 0]
    pages_per_row = [1, -1, 0, 0, 0]
    pack_pages = [1, 0, 0, -1, -1]
    paged = paged_kv(seq_lens, num_kv_heads=heads, head_dim=head_dim, block_size=block_size,
                     dtype=dtype, seed=11)  # fmt: skip
    layout = LowBitLayout.for_cache(paged.key_cache, bits, value_group)
    packed = _pack_rows(paged, layout, [max(n, 0) for n in pages_per_row])
    packed[1] = -1
    gen = torch.Generator().manual_seed(12)
    query = torch.randn(len(seq_lens), 2 * heads, head_dim, generator=gen).to(dtype).to(device)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device)
    qsl[-1] = qsl[-2]  # the last row is padding
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    pack = torch.tensor(pack_pages, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    original = paged.kv_cache.clone()
    ref_cache = paged.kv_cache.clone()
    ref_k, ref_v = ref_cache.transpose(1, 2).split(head_dim, dim=-1)
    ref = packed_decode_attention_ref(query, ref_k, ref_v, paged.block_table, qsl, lens,
                                      packed, torch.zeros_like(query), scale=scale,
                                      layout=layout, pack_pages=pack)  # fmt: skip
    words = page_views(paged.key_cache)[0]
    stage = torch.full((len(seq_lens) + 2, words.shape[1]), -7, dtype=torch.int32,
                       device=device)  # fmt: skip
    arrivals = torch.zeros(len(seq_lens) * (heads + 1), dtype=torch.int32, device=device)
    out = packed_decode_attention(query, paged.key_cache, paged.value_cache, paged.block_table,
                                  qsl, lens, packed, torch.zeros_like(query), scale=scale,
                                  layout=layout, splits=splits, arrivals=arrivals,
                                  pack_pages=pack, stage=stage)  # fmt: skip
    assert (arrivals == 0).all()
    assert torch.equal(paged.kv_cache.view(torch.uint8), ref_cache.view(torch.uint8))
    rows = [0, 2, 3]
    err = (out[rows].float() - ref[rows].float()).norm() / ref[rows].float().norm()
    assert err < TOLERANCE[dtype], err
    assert (out[1] == 0).all()  # left to vLLM's attention
    # The packed pages hold what their blocks held, within the quantisation error.
    per_page = layout.blocks_per_page
    orig_k, orig_v = original.transpose(1, 2).split(head_dim, dim=-1)
    for i, p in ((0, 1), (1, 0), (2, 0)):
        src = paged.block_table[i, p * per_page : (p + 1) * per_page].long()
        keys, values = unpack_pages_ref(paged.key_cache, src[:1], layout)
        for unpacked, orig in ((keys, orig_k), (values, orig_v)):
            expected = orig[src].float().flatten(0, 1)  # [R * block, heads, dim]
            err = (unpacked[0] - expected).abs().max() / expected.abs().max()
            assert err < {2: 0.35, 4: 0.08}[bits]


# Compiles both kernels for an H100 (sm_90) with Triton's bundled ptxas, no GPU needed, at
# Llama-3.1-8B head shapes with a bf16 or fp16 cache (the CPU tests run fp32 dots in the
# interpreter; this checks that the GPU's 16-bit variants build, and that they dequantise
# two codes at a time with the inline PTX, which the interpreter cannot run).
COMPILE_FOR_SM90 = """
import sys
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_fastkv.kernels import packed_attention, quantization
from vllm_fastkv.packed_layout import LowBitLayout

bits = int(sys.argv[1])
cache = f"*{sys.argv[3]}"  # the cache's pointer type
dtype = {"*bf16": torch.bfloat16, "*fp16": torch.float16}[cache]
layout = LowBitLayout.for_cache(torch.empty(1, 16, 8, 128, dtype=dtype), bits, 32)
ks, km, vs, vm = layout.scale_offsets()
shape = dict(BITS=bits, BLOCK=16, DIM=128, NUM_HEADS=8, HEAD_WORDS=layout.head_bytes // 4,
             VALUE_CODES=layout.value_codes_offset, KEY_SCALE=ks, KEY_MIN=km,
             VALUE_SCALE=vs, VALUE_MIN=vm)
tile_blocks = int(sys.argv[2])
kernels = [
    (quantization._pack_kernel, dict(key_ptr=cache, value_ptr=cache, src_ptr="*i32",
     stage_words_ptr="*i32", stage_halves_ptr="*fp16"), dict(shape, GROUP=32), {}),
    (quantization._copy_pages_kernel, dict(words_ptr="*i32", stage_ptr="*i32",
     src_ptr="*i32"), dict(BLOCK=1024), {}),
    (packed_attention._packed_decode_kernel, dict(query_ptr=cache, key_ptr=cache,
     value_ptr=cache, words_ptr="*i32", halves_ptr="*fp16", block_table_ptr="*i32",
     qsl_ptr="*i32", seq_lens_ptr="*i32", packed_ptr="*i32", part_max_ptr="*fp32",
     part_sum_ptr="*fp32", part_acc_ptr="*fp32", arrivals_ptr="*i32", out_ptr=cache,
     pack_ptr="*i32", stage_ptr="*i32", stage_halves_ptr="*fp16"),
     dict(shape, VGROUP=32, R=layout.blocks_per_page, G_PAD=16, TILE_BLOCKS=tile_blocks,
          TILES_PER_PAGE=triton.cdiv(layout.blocks_per_page, tile_blocks),
          DOT_DTYPE={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype],
          DOT_PRECISION="tf32", MERGE_G_PAD=4, SPLITS_PAD=16,
          USED_WORDS=layout.used_page_words, COPY_BLOCK=packed_attention.PAGE_COPY_WORDS),
     dict(maxnreg=packed_attention.MAX_REGISTERS)),  # as packed_decode_attention launches it
]
for kernel, pointers, constexprs, launch_options in kernels:
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in kernel.arg_names}
    if "qk_scale" in signature:
        signature["qk_scale"] = "fp32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=2, **launch_options))
    assert compiled.asm["cubin"]
    if kernel is packed_attention._packed_decode_kernel:
        # A tile's K and V codes (2 x 128 channels x 16 tokens a block) over 128 threads,
        # two codes per multiply-add.
        pairs = compiled.asm["ptx"].count(f"fma.rn.{sys.argv[3].replace('fp', 'f')}x2")
        assert pairs == 16 * tile_blocks, pairs
    print(kernel.fn.__name__, "ok")
"""


@pytest.mark.parametrize(("bits", "tile_blocks", "dtype"),
                         [(2, 1, "bf16"), (2, 4, "bf16"), (4, 2, "bf16"), (2, 4, "fp16")])
def test_kernels_compile_for_sm90(bits, tile_blocks, dtype):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90, str(bits), str(tile_blocks), dtype],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" ok") == 3


# The launches of one decode step, recorded instead of run, and the key under which
# Triton's JIT caches each compiled kernel (its specialisation of the arguments plus the
# options), computed as Triton's own launcher computes it, for an sm_90 target.
COMPILE_KEYS = """
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature
from vllm_fastkv.kernels import packed_attention, quantization
from vllm_fastkv.kernels.packed_attention import splits_for
from vllm_fastkv.packed_layout import LowBitLayout, page_views

backend = make_backend(GPUTarget("cuda", 90, 32))
keys = {}

class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kernel = self.kernel
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            kwargs = {"num_warps": 4, "num_stages": 3, **kwargs}
            _, spec, options = binder(*args, **kwargs, debug=False, instrumentation_mode="")
            keys.setdefault(kernel.fn.__name__, set()).add(compute_cache_key({}, spec, options))
        return launch

for module, name in [(packed_attention, "_packed_decode_kernel"),
                     (quantization, "_pack_kernel"), (quantization, "_copy_pages_kernel")]:
    setattr(module, name, Recorder(getattr(module, name)))
kv = torch.zeros(64, 16, 8, 256, dtype=torch.bfloat16)
key_cache, value_cache = kv.split(128, dim=-1)
layout = LowBitLayout.for_cache(key_cache, 2, 32)
max_rows = 24
block_table = torch.zeros(max_rows, 32, dtype=torch.int32)
stage = torch.zeros(max_rows, page_views(key_cache)[0].shape[1], dtype=torch.int32)
for rows in range(1, max_rows + 1):
    # Splits as decode_splits picks them on a 132-multiprocessor GPU, and 1 and 16; a
    # launch packing pages and one packing none.
    for splits in {1, 16, splits_for(rows, 8, 132)}:
        query = torch.zeros(rows, 32, 128, dtype=torch.bfloat16)
        ones = torch.ones(rows, dtype=torch.int32)
        for pack_pages in (None, ones - 2):
            packed_attention.packed_decode_attention(
                query, key_cache, value_cache, block_table,
                torch.arange(rows + 1, dtype=torch.int32), ones, ones, query.clone(),
                scale=0.1, layout=layout, splits=splits, pack_pages=pack_pages, stage=stage)
    quantization.pack_kv(key_cache, value_cache, block_table[:rows, :4], layout)
print(sorted((name, len(found)) for name, found in keys.items()))
"""


def test_decode_kernels_compile_once_for_every_batch_size():
    """A decode step's Triton kernels share one compiled variant for every batch size and
    split count: eager steps (a prefill chunk beside decodes) have any number of rows,
    and a variant per split count once compiled both packed-decode kernels again in the
    middle of serving (the likely cause of seconds in a 2-bit decode run's TPOT on an
    H200, docs/BENCHMARKS.md). Checked on the JIT cache keys Triton computes for sm_90,
    no GPU needed."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_KEYS], env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == str([("_copy_pages_kernel", 1), ("_pack_kernel", 1),
                                       ("_packed_decode_kernel", 1)])
