"""Plain-torch oracles for the FastKV kernels, on vLLM's paged KV cache.

Every function here has the signature and semantics of its fast counterpart in
:mod:`vllm_fastkv.kernels` (name without the ``_ref`` suffix). They are written for
obviousness, not speed: a Python loop over sequences (and KV heads for scoring), a dense
gather of each sequence's keys through its block table, softmax in fp32. Memory stays
bounded by one sequence x one KV head, so they also check the fast paths at real sizes
(128K tokens) on a GPU.

Layout (vLLM 0.26): ``key_cache``/``value_cache`` are 4-D views
``[num_blocks, block_size, num_kv_heads, head_dim]`` (any strides); token ``t`` of
sequence ``s`` lives at block ``block_table[s, t // block_size]``, slot
``t % block_size``. Query head ``q`` reads KV head ``q // (num_q_heads // num_kv_heads)``.

The argument checks and output-shape rules at the top are shared with the fast paths, so
both sides reject the same inputs and agree on padding widths.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vllm_fastkv.packed_layout import LowBitLayout, page_views
from vllm_fastkv.reference.quantization import dequantize_groups_ref, quantize_groups_ref

Pooling = Literal["avg", "max"]


def check_scoring_args(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int,
    pool_kernel: int,
    pooling: str,
) -> None:
    """Raise ``ValueError`` on shapes or settings the scoring functions do not define."""
    if query.dim() != 4 or key_cache.dim() != 4:
        raise ValueError(
            "query must be [num_seqs, window, num_q_heads, head_dim] and "
            "key_cache [num_blocks, block_size, num_kv_heads, head_dim]"
        )
    num_seqs, q_window, num_q_heads, head_dim = query.shape
    if q_window != window or window < 1:
        raise ValueError(f"query holds {q_window} window queries, expected window={window} >= 1")
    if key_cache.shape[-1] != head_dim:
        raise ValueError(f"head_dim mismatch: query {head_dim}, key_cache {key_cache.shape[-1]}")
    if num_q_heads % key_cache.shape[2]:
        raise ValueError(
            f"{num_q_heads} query heads do not group over {key_cache.shape[2]} KV heads"
        )
    if seq_lens.shape != (num_seqs,) or block_table.dim() != 2 or block_table.shape[0] < num_seqs:
        raise ValueError("seq_lens must be [num_seqs] and block_table [>= num_seqs, max_blocks]")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd number, got {pool_kernel}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")


def scored_width(seq_lens: torch.Tensor, window: int) -> int:
    """Width of the score rows: tokens before the window of the longest sequence (>= 0)."""
    if seq_lens.numel() == 0:
        return 0
    return max(int(seq_lens.max()) - window, 0)


def kept_count(seq_len: int, budget: int, window: int) -> int:
    """Tokens a sequence keeps: ``min(max(B, window), T)``.

    A budget below the window is raised to it because the window is always kept (the same
    clamp as :func:`vllm_fastkv.reference.scoring.token_budget`); a prompt no longer than
    its budget keeps everything.
    """
    return min(max(budget, window), seq_len)


def gather_tokens(
    cache: torch.Tensor, block_table_row: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Rows ``[len(tokens), num_kv_heads, head_dim]`` of one sequence's logical ``tokens``."""
    block_size = cache.shape[1]
    tokens = tokens.long()
    return cache[block_table_row.long()[tokens // block_size], tokens % block_size]


def check_window_lse(lse: torch.Tensor | None, query: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``lse`` is ``None`` or fp32 ``[num_seqs, window, heads]``."""
    if lse is None:
        return
    if lse.shape != query.shape[:3] or lse.dtype != torch.float32:
        raise ValueError(
            f"lse must be float32 {list(query.shape[:3])} (sequences, window, query heads), "
            f"got {lse.dtype} {list(lse.shape)}"
        )


def _visible_keys(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """``[window, T]``: window query ``i`` (position ``T - window + i``) sees keys up to it."""
    return torch.ones(window, seq_len, dtype=torch.bool, device=device).tril(seq_len - window)


def _window_logits(
    query: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, s: int,
    seq_len: int, h: int, group: int, *, scale: float, k_scale: float,
) -> torch.Tensor:  # fmt: skip
    """fp32 ``[group, window, T]`` logits of KV head ``h``'s query group, ``-inf`` where a
    window query does not see the key."""
    keys = gather_tokens(key_cache, block_table[s], torch.arange(seq_len, device=key_cache.device))
    q = query[s, :, h * group : (h + 1) * group].float().transpose(0, 1)  # [G, w, d]
    logits = torch.matmul(q, (keys[:, h].float() * k_scale).T) * scale
    return logits.masked_fill(~_visible_keys(seq_len, query.shape[1], query.device), float("-inf"))


def window_lse_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window: int,
    k_scale: float = 1.0,
) -> torch.Tensor:
    """Natural-log log-sum-exp of each window query's logits over the keys it sees.

    fp32 ``[num_seqs, window, num_q_heads]``: what causal FlashAttention returns for these
    queries (``return_softmax_lse``), the normaliser :func:`window_scores_ref` takes as
    ``lse``. Rows of sequences shorter than the window are ``-inf`` where they see no key.
    """
    # The shape checks of scoring; no pooling here, so any valid pooling settings.
    check_scoring_args(query, key_cache, block_table, seq_lens, window, 1, "avg")
    num_seqs, _, num_q_heads, _ = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.full((num_seqs, window, num_q_heads), float("-inf"), device=query.device)
    for s, seq_len in enumerate(seq_lens.tolist()):
        if seq_len < 1:
            continue
        for h in range(num_kv_heads):
            logits = _window_logits(query, key_cache, block_table, s, seq_len, h, group,
                                    scale=scale, k_scale=k_scale)  # fmt: skip
            out[s, :, h * group : (h + 1) * group] = logits.logsumexp(dim=-1).T
    return out


def window_scores_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window: int,
    pool_kernel: int = 7,
    pooling: Pooling = "avg",
    k_scale: float = 1.0,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled, GQA-summed attention mass of the window queries on each earlier token.

    Returns fp32 ``[num_seqs, num_kv_heads, scored_width]``; entry ``[s, h, j]`` for
    ``j < T_s - window`` scores token ``j``, the rest is ``-inf``. Window query ``i``
    (position ``T - window + i``) sees keys ``0 .. T - window + i``. Pooling runs per
    query head before the group sum, which matters for max pooling. ``lse``
    (:func:`window_lse_ref`'s layout), if given, is the softmax normaliser used instead of
    the one computed here: the mass is ``exp(logit - lse)``.
    """
    check_scoring_args(query, key_cache, block_table, seq_lens, window, pool_kernel, pooling)
    check_window_lse(lse, query)
    num_seqs, _, num_q_heads, _ = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    width = scored_width(seq_lens, window)
    out = torch.full((num_seqs, num_kv_heads, width), float("-inf"), device=query.device)
    for s, seq_len in enumerate(seq_lens.tolist()):
        num_scored = seq_len - window
        if num_scored <= 0:
            continue
        for h in range(num_kv_heads):
            logits = _window_logits(query, key_cache, block_table, s, seq_len, h, group,
                                    scale=scale, k_scale=k_scale)  # fmt: skip
            if lse is None:
                probs = logits.softmax(dim=-1)
            else:
                norm = lse[s, :, h * group : (h + 1) * group].T.to(logits.device)  # [G, w]
                probs = (logits - norm[..., None]).exp()
            mass = probs[..., :num_scored].sum(dim=1).unsqueeze(1)  # [G, 1, T - w]
            pad = pool_kernel // 2
            if pooling == "avg":
                pooled = F.avg_pool1d(mass, pool_kernel, 1, pad, count_include_pad=True)
            else:
                pooled = F.max_pool1d(mass, pool_kernel, 1, pad)
            out[s, h, :num_scored] = pooled.sum(dim=(0, 1))
    return out


def select_retained_ref(
    scores: torch.Tensor, seq_lens: torch.Tensor, budgets: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-KV-head kept tokens: top ``B - window`` scored ones plus the last ``window``.

    ``scores``: ``[num_seqs, heads, width]`` from :func:`window_scores_ref`. Returns
    ``(indices, counts)``: int64 ``[num_seqs, heads, max(counts)]`` sorted ascending per
    head and padded with ``-1``, and ``counts = min(max(B, window), T)``. A sequence with
    ``T <= B`` keeps all of ``0 .. T-1``.
    """
    num_seqs, heads, _ = scores.shape
    if seq_lens.shape != budgets.shape or seq_lens.shape != (num_seqs,):
        raise ValueError("seq_lens and budgets must both be [num_seqs]")
    counts = torch.tensor(
        [kept_count(t, b, window) for t, b in zip(seq_lens.tolist(), budgets.tolist())],
        dtype=torch.long,
        device=scores.device,
    )
    width = int(counts.max()) if num_seqs else 0
    indices = torch.full((num_seqs, heads, width), -1, dtype=torch.long, device=scores.device)
    for s, (seq_len, count) in enumerate(zip(seq_lens.tolist(), counts.tolist())):
        if count == seq_len:
            kept = torch.arange(seq_len, device=scores.device).expand(heads, seq_len)
        else:
            top = scores[s, :, : seq_len - window].topk(count - window, dim=-1).indices
            recent = torch.arange(seq_len - window, seq_len, device=scores.device).expand(
                heads, window
            )
            kept = torch.cat([top, recent], dim=-1).sort(dim=-1).values
        indices[s, :, :count] = kept
    return indices, counts


def select_propagated_ref(
    scores: torch.Tensor, seq_lens: torch.Tensor, keep: torch.Tensor, window: int
) -> torch.Tensor:
    """TSP selection: one token set per sequence from the head-summed scores.

    Returns int64 ``[num_seqs, max kept]``, sorted ascending, ``-1`` padded; a sequence
    keeps ``min(max(P, window), T)`` tokens.
    """
    return select_retained_ref(scores.sum(dim=1, keepdim=True), seq_lens, keep, window)[0][:, 0]


def check_compaction_starts(starts: torch.Tensor | None, num_seqs: int) -> None:
    """Raise ``ValueError`` unless ``starts`` is ``None`` or an integer ``[num_seqs]``."""
    if starts is None:
        return
    if starts.shape != (num_seqs,):
        raise ValueError(f"starts must be [num_seqs] = [{num_seqs}], got {list(starts.shape)}")
    if starts.dtype.is_floating_point or starts.dtype.is_complex or starts.dtype == torch.bool:
        raise ValueError(f"starts must be an integer tensor, got {starts.dtype}")


def compact_kv_ref(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    starts: torch.Tensor | None = None,
) -> None:
    """In place: logical token ``starts[s] + r`` (``r < counts[s]``; ``starts`` ``None``
    means zeros) of sequence ``s``, KV head ``h`` becomes the old logical token
    ``indices[s, h, r]``, for both K and V.

    Gathers every kept row of every sequence before writing any, so no ordering question
    arises. Moves bytes (through a ``uint8`` view), so fp8 caches work unchanged.
    """
    check_compaction_starts(starts, indices.shape[0])
    block_size = key_cache.shape[1]
    heads = torch.arange(key_cache.shape[2], device=key_cache.device)[:, None]
    start_list = [0] * len(counts) if starts is None else starts.tolist()
    for cache in (key_cache, value_cache):
        raw = cache.view(torch.uint8)
        kept = []  # copies: [heads, count, bytes] per sequence
        for s, count in enumerate(counts.tolist()):
            blocks = block_table[s].long()
            src = indices[s, :, :count].long()  # [heads, count]
            kept.append(raw[blocks[src // block_size], src % block_size, heads])
        for s, count in enumerate(counts.tolist()):
            blocks = block_table[s].long()
            dst = start_list[s] + torch.arange(count, device=cache.device)
            raw[blocks[dst // block_size], dst % block_size, heads] = kept[s]


# ------------------------------------------------------------------ low-bit KV
# The packed page layout is vllm_fastkv.packed_layout's. These oracles quantise and
# dequantise with vllm_fastkv.reference.quantization's group arithmetic, which the Triton
# kernels follow (IEEE division, round half up, fp16 scales), so codes and scales match
# bit for bit.


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words from codes ``[..., n]``: word ``w`` holds codes ``w * k + i`` (``k =
    32 / bits``) in bits ``[i * bits, (i + 1) * bits)``."""
    per_word = 32 // bits
    grouped = codes.long().reshape(*codes.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, device=codes.device) * bits
    words = (grouped << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[..., n * (32 / bits)]`` from int32 words (the inverse of ``_pack_words``)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device) * bits
    codes = (words.long()[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*words.shape[:-1], -1)


def _head_region(
    layout: LowBitLayout, words: torch.Tensor, halves: torch.Tensor, page: int, r: int, h: int
) -> tuple[torch.Tensor, ...]:
    """Views of (sub-block ``r``, head ``h``)'s regions in ``page``: key codes
    ``[dim, key_words]``, value codes ``[block, value_words]``, key scale/min ``[dim]``,
    value scale/min ``[block, groups]``."""
    start = layout.head_words_start(r, h)
    key_codes = words[page, start : start + layout.value_codes_offset]
    value_start = start + layout.value_codes_offset
    value_codes = words[page, value_start : value_start + layout.block_size * layout.value_words]
    key_scale, key_min, value_scale, value_min = (2 * start + o for o in layout.scale_offsets())
    per_token = layout.block_size * layout.value_groups
    return (
        key_codes.view(layout.head_dim, layout.key_words),
        value_codes.view(layout.block_size, layout.value_words),
        halves[page, key_scale : key_scale + layout.head_dim],
        halves[page, key_min : key_min + layout.head_dim],
        halves[page, value_scale : value_scale + per_token].view(layout.block_size, -1),
        halves[page, value_min : value_min + per_token].view(layout.block_size, -1),
    )


def pack_kv_ref(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src_blocks: torch.Tensor,
    layout: LowBitLayout,
) -> None:
    """In place: the ``R`` full-precision blocks ``src_blocks[g]`` (``[n, R]``, in logical
    order) are quantised into the page of ``src_blocks[g, 0]``.

    Every group's blocks are read before any page is written, so a page may be one of its
    own sources (it always is: the first). Keys: per channel over each block's tokens;
    values: per token over ``layout.value_group`` channels.
    """
    words, halves = page_views(key_cache)
    groups = src_blocks.long().tolist()
    blocks = [
        (key_cache[row].float().clone(), value_cache[row].float().clone())
        for row in src_blocks.long()
    ]  # [R, block, heads, dim] each
    for (keys, values), group in zip(blocks, groups):
        page = group[0]
        for r in range(layout.blocks_per_page):
            for h in range(layout.num_kv_heads):
                kc, vc, ks, km, vs, vm = _head_region(layout, words, halves, page, r, h)
                codes, scale, minimum = quantize_groups_ref(keys[r, :, h].T, layout.bits, dim=1)
                kc.copy_(_pack_words(codes, layout.bits))
                ks.copy_(scale[:, 0])
                km.copy_(minimum[:, 0])
                grouped = values[r, :, h].reshape(layout.block_size, layout.value_groups, -1)
                codes, scale, minimum = quantize_groups_ref(grouped, layout.bits, dim=2)
                vc.copy_(_pack_words(codes.flatten(1), layout.bits))
                vs.copy_(scale[..., 0])
                vm.copy_(minimum[..., 0])


def unpack_pages_ref(
    key_cache: torch.Tensor, pages: torch.Tensor, layout: LowBitLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised fp32 K and V ``[n, R * block_size, num_kv_heads, head_dim]`` of packed
    ``pages`` (``[n]`` block ids), tokens in logical order."""
    words, halves = page_views(key_cache)
    n, r_count = pages.numel(), layout.blocks_per_page
    shape = (n, r_count, layout.block_size, layout.num_kv_heads, layout.head_dim)
    keys = torch.empty(shape, dtype=torch.float32, device=key_cache.device)
    values = torch.empty_like(keys)
    for i, page in enumerate(pages.long().tolist()):
        for r in range(r_count):
            for h in range(layout.num_kv_heads):
                kc, vc, ks, km, vs, vm = _head_region(layout, words, halves, page, r, h)
                key_codes = _unpack_words(kc, layout.bits)  # [dim, block]
                keys[i, r, :, h] = dequantize_groups_ref(key_codes, ks[:, None], km[:, None]).T
                value_codes = _unpack_words(vc, layout.bits).view(
                    layout.block_size, layout.value_groups, -1
                )
                values[i, r, :, h] = dequantize_groups_ref(
                    value_codes, vs[..., None], vm[..., None]
                ).flatten(1)
    return keys.flatten(1, 2), values.flatten(1, 2)


def packed_decode_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    packed_pages: torch.Tensor,
    output: torch.Tensor,
    *,
    scale: float,
    layout: LowBitLayout,
    pack_pages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of the rows with ``packed_pages[i] = n >= 0``, into ``output``;
    then, for every row with ``pack_pages[i] = p >= 0``, its page ``p`` packed in place.

    Such a row has one query, ``query[query_start_loc[i]]`` (``[num_q_heads,
    head_dim]``), and ``seq_lens[i]`` visible tokens: the first ``n * R * block_size`` in the
    packed pages ``block_table[i, k * R]`` (``k < n``), the rest in full-precision blocks
    from column ``n * R`` on. Writes that query's output row (zeros without a visible
    token); rows with ``n == -1`` or without a query (batch padding) are left untouched.
    Softmax and products in fp32. Packing after attending: blocks ``block_table[i, p * R
    + r]`` (``r < R``) into the page of the first (:func:`pack_kv_ref`), whether or not
    the row was attended here.
    """
    group = query.shape[1] // key_cache.shape[2]
    page_tokens = layout.page_tokens
    starts = query_start_loc.tolist()
    for i, (seq_len, n) in enumerate(zip(seq_lens.tolist(), packed_pages.tolist())):
        if n < 0 or starts[i + 1] == starts[i]:
            continue
        if seq_len == 0:
            output[starts[i]] = 0
            continue
        row = block_table[i].long()
        pages = row[: n * layout.blocks_per_page : layout.blocks_per_page]
        keys, values = unpack_pages_ref(key_cache, pages, layout)
        rest = torch.arange(n * page_tokens, seq_len, device=query.device)
        blocks, slots = row[rest // layout.block_size], rest % layout.block_size
        keys = torch.cat([keys.flatten(0, 1), key_cache[blocks, slots].float()])
        values = torch.cat([values.flatten(0, 1), value_cache[blocks, slots].float()])
        q = query[starts[i]].float()  # [heads, dim]
        k = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, seq, dim]
        v = values.transpose(0, 1).repeat_interleave(group, dim=0)
        probs = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * scale, dim=-1)
        output[starts[i]] = torch.einsum("hs,hsd->hd", probs, v).to(output.dtype)
    if pack_pages is not None:
        per_page = layout.blocks_per_page
        groups = [block_table[i, p * per_page : (p + 1) * per_page]
                  for i, p in enumerate(pack_pages.tolist()) if p >= 0]  # fmt: skip
        if groups:
            pack_kv_ref(key_cache, value_cache, torch.stack(groups), layout)
    return output
