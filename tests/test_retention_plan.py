"""Retention planning (shared by scheduler and workers) and per-request overrides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_fastkv.config import FastKVConfig, FastKVConfigError
from vllm_fastkv.retention import pages_to_pack, plan_retention, request_settings

ENGINE = FastKVConfig.validated({"retain_rate": 0.25, "tsp_rate": 1.0})


def test_layout_of_a_compressed_prompt():
    plan = plan_retention(ENGINE, 300, 16)
    # B = int(0.25 * 300) = 75; S = floor((300 - 75) / 16) * 16 = 224; kept = 76.
    assert (plan.prompt_len, plan.start, plan.kept) == (300, 224, 76)


@pytest.mark.parametrize(
    ("settings", "prompt_len"),
    [
        ({"retain_rate": 0.25}, 20),  # budget within one block of the prompt
        ({"retain_rate": 1.0}, 4000),
        ({"enabled": False}, 4000),
        ({"mode": "constant", "max_capacity_prompt": 512}, 520),
    ],
    ids=["short", "rate-1", "disabled", "constant-near-capacity"],
)
def test_prompts_left_whole(settings, prompt_len):
    assert plan_retention(FastKVConfig.validated(settings), prompt_len, 16) is None


def test_constant_mode():
    settings = FastKVConfig.validated({"mode": "constant", "max_capacity_prompt": 512})
    plan = plan_retention(settings, 32768, 16)
    assert plan.kept == 512 and plan.start == 32768 - 512


def test_low_bit_pages_of_a_32k_prompt():
    """Llama-3.1-8B pages at 2 bits hold R = 4 blocks (64 slots): 3,280 kept slots minus
    the 128-token residual fold into 49 pages, which free 147 more blocks."""
    settings = FastKVConfig.validated({"retain_rate": 0.1, "kv_bits": 2})
    plan = plan_retention(settings, 32768, 16, page_tokens=64)
    assert (plan.kept, plan.packed_pages) == (3280, (3280 - 128) // 64) == (3280, 49)
    assert plan_retention(ENGINE, 32768, 16, page_tokens=64).packed_pages == 0  # 16 bits
    tight = FastKVConfig.validated({"retain_rate": 0.1, "kv_bits": 2, "kv_residual": 3280})
    assert plan_retention(tight, 32768, 16, page_tokens=64).packed_pages == 0


def test_mixed_precision_layout_of_a_32k_prompt():
    """Evicted entries kept at 2 bits: nothing freed before S = 29,488, the 3,280
    selected entries after it at 16 bits, and the 460 whole 64-slot pages of the evicted
    slots packed (R = 4: 1,380 blocks back to the pool), however long the request grows."""
    settings = FastKVConfig.validated({"retain_rate": 0.1, "evicted_bits": 2, "tsp_rate": 1.0})
    plan = plan_retention(settings, 32768, 16, page_tokens=64)
    assert (plan.start, plan.evicted, plan.kept) == (0, 32768 - 3280, 3280)
    assert plan.packed_pages == (32768 - 3280) // 64 == 460
    assert pages_to_pack(settings, plan, 32768 + 5000, 64) == 460
    # A prompt too short to free a block stays whole, as with retention alone.
    assert plan_retention(settings, 20, 16, page_tokens=64) is None


@given(
    prompt_len=st.integers(1, 200_000),
    rate=st.floats(0.01, 1.0),
    residual=st.integers(0, 4096),
    per_page=st.integers(2, 9),
)
def test_packed_pages_stay_inside_the_kept_slots(prompt_len, rate, residual, per_page):
    settings = FastKVConfig.validated({"retain_rate": rate, "kv_bits": 4,
                                       "kv_residual": residual})  # fmt: skip
    plan = plan_retention(settings, prompt_len, 16, page_tokens=16 * per_page)
    if plan is None:
        return
    packed = plan.packed_pages * 16 * per_page
    # Whole pages, before the residual, and no page could be added.
    assert 0 <= packed <= plan.kept - residual or packed == 0
    assert plan.kept - residual - packed < 16 * per_page


@given(
    prompt_len=st.integers(1, 200_000),
    rate=st.floats(0.01, 1.0),
    block_size=st.sampled_from([16, 32, 64, 128]),
    window=st.integers(1, 64),
)
def test_layout_invariants(prompt_len, rate, block_size, window):
    settings = FastKVConfig.validated({"retain_rate": rate, "window": window})
    budget = settings.retention_budget(prompt_len)
    plan = plan_retention(settings, prompt_len, block_size)
    if plan is None:
        assert prompt_len - budget < block_size or rate == 1.0
        return
    assert plan.start % block_size == 0 and plan.start > 0
    assert budget <= plan.kept < budget + block_size
    assert plan.kept >= window
    assert plan.start + plan.kept == prompt_len


def test_request_overrides():
    assert request_settings(ENGINE, None) is ENGINE
    assert request_settings(ENGINE, {"other": 1}) is ENGINE
    assert request_settings(ENGINE, {"fastkv": {"retain_rate": 0.5}}).retain_rate == 0.5
    assert request_settings(ENGINE, {"fastkv": {"enabled": False}}).enabled is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"retain_rate": 2}, "fastkv.retain_rate=2"),
        ({"bogus": 1}, "fastkv.bogus: unknown setting"),
        ({"window": 4}, "fastkv.window: set per deployment"),
        ({"tsp_layer": 1}, "fastkv.tsp_layer: set per deployment"),
        ("fast", "must be a JSON object"),
    ],
)
def test_bad_request_overrides_name_the_field(override, message):
    with pytest.raises(FastKVConfigError, match="Invalid FastKV setting") as info:
        request_settings(ENGINE, {"fastkv": override})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("computed", "scheduled", "expected"),
    [
        (0, 64, 64),  # far from the end
        (192, 64, 59),  # would leave 3 of 259: stop where 8 remain
        (192, 67, 67),  # reaches the end
        (253, 6, 6),  # already inside the last window (after preemption): unchanged
        (300, 1, 1),  # decode
    ],
)
def test_final_chunk_is_at_least_the_window(computed, scheduled, expected):
    from vllm_fastkv.retention_scheduler import FastKVScheduler

    scheduler = SimpleNamespace(fastkv_min_final_chunk=8)
    request = SimpleNamespace(num_computed_tokens=computed, num_prompt_tokens=259)
    split = FastKVScheduler._mamba_block_aligned_split
    assert split(scheduler, request, scheduled) == expected


def test_a_decoding_request_packs_the_page_its_token_completes():
    """Low-bit KV while decoding: the step whose token (written at slot ``computed``)
    completes one more page past ``kv_residual`` packs it, after its attention, which still
    reads the old page count; the next step reads one page more. Stepped token by token,
    every page is packed exactly once, in order, and a step's attention never reads a page
    that holds a token written in that step or within ``kv_residual`` of it."""
    from vllm_fastkv.retention import RetentionStepPlan
    from vllm_fastkv.retention_scheduler import _RetentionSchedulerMixin

    settings = FastKVConfig.validated({"retain_rate": 0.25, "kv_bits": 2, "kv_residual": 16})
    page_tokens = 32
    origin = plan_retention(settings, 300, 16, page_tokens)
    request = SimpleNamespace(num_computed_tokens=origin.prompt_len)
    scheduler = SimpleNamespace(
        fastkv=settings, fastkv_page_tokens=page_tokens, requests={"r": request},
        fastkv_retained={"r": origin}, fastkv_origin={"r": origin},
    )  # fmt: skip
    packed_at: list[int] = []
    for _ in range(200):
        retained = scheduler.fastkv_retained["r"]
        plan = RetentionStepPlan()
        _RetentionSchedulerMixin._grow_pages(scheduler, "r", retained, plan)
        written = request.num_computed_tokens  # the slot this step's token goes to
        read_end = retained.start + retained.packed_pages * page_tokens
        assert read_end <= written + 1 - settings.kv_residual
        if "r" in plan.pack:
            page, lineage = plan.pack["r"]
            assert page == retained.packed_pages and lineage is origin
            # The page ends exactly kv_residual slots before the end of the cache.
            assert retained.start + (page + 1) * page_tokens == written + 1 - settings.kv_residual
            assert scheduler.fastkv_retained["r"].packed_pages == page + 1
            packed_at.append(written)
        else:
            assert scheduler.fastkv_retained["r"] is retained
        request.num_computed_tokens += 1
    due = pages_to_pack(settings, origin, origin.prompt_len + 200, page_tokens)
    assert len(packed_at) == due - origin.packed_pages >= 6
    assert all(b - a == page_tokens for a, b in zip(packed_at, packed_at[1:]))
