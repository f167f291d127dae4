"""Runs one vLLM engine in its own process and prints greedy token ids as JSON.

Each engine gets a fresh process so engines with different backends never share
vLLM's process-global state, exactly as two separate deployments would not.

    python generate_worker.py '{"model": ..., "engine": {...}, "prompts": [[ids...], ...],
                                "max_tokens": 16}'
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
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        "backends": sorted(set(llm.collective_rpc(_attention_backend_names)[0])),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
