"""Runs one vLLM engine in its own process and prints greedy token ids as JSON.

Each engine gets a fresh process so engines with different backends never share
vLLM's process-global state, exactly as two separate deployments would not.

    python generate_worker.py '{"model": ..., "engine": {...}, "prompts": [[ids...], ...],
                                "max_tokens": 16, "extra_args": [{...} | null, ...]}'

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the scheduler lives in this process, and the
result also reports its KV block pool and, for FASTKV with retention, its totals.
"""

from __future__ import annotations

import json
import sys

RESULT_PREFIX = "GENERATE_RESULT "


def _attention_backend_names(worker) -> list[str]:
    """Names of the attention backends the worker's model layers actually run."""
    from vllm.model_executor.layers.attention import Attention

    context = worker.model_runner.compilation_config.static_forward_context
    return [
        layer.attn_backend.get_name() for layer in context.values() if isinstance(layer, Attention)
    ]


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["engine"])
    extra_args = spec.get("extra_args") or [None] * len(spec["prompts"])
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, extra_args=extra
        )
        for extra in extra_args
    ]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    scheduler = _in_process_scheduler(llm)
    counts = {"preemptions": 0}
    if scheduler is not None:
        counts["scheduler_cls"] = type(scheduler).__name__
        counts["prefix_caching"] = bool(scheduler.cache_config.enable_prefix_caching)
        counts["free_blocks_start"] = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        _count_preemptions(scheduler, counts)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        "backends": sorted(set(llm.collective_rpc(_attention_backend_names)[0])),
    }
    if scheduler is not None:
        counts["free_blocks_end"] = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        stats = getattr(scheduler, "fastkv_stats", None)
        if stats is not None:
            counts.update(
                compressed_prompts=stats.prompts,
                kept_tokens=stats.kept_tokens,
                freed_blocks=stats.freed_blocks,
                packed_pages=stats.packed_pages,
                block_size=scheduler.fastkv_block_size,
                blocks_per_page=scheduler.fastkv_blocks_per_page,
                propagated_prompts=stats.propagated,
                buffer_tokens_in_use=scheduler.fastkv_buffer.used,
            )
        result["scheduler"] = counts
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _in_process_scheduler(llm):
    """The engine's scheduler when the engine core runs in this process, else None."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    return getattr(core, "scheduler", None)


def _count_preemptions(scheduler, counts: dict) -> None:
    preempt = scheduler._preempt_request

    def counting(request, timestamp):
        counts["preemptions"] += 1
        return preempt(request, timestamp)

    scheduler._preempt_request = counting


if __name__ == "__main__":
    main()
