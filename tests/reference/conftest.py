"""Fixtures for the reference tests: tiny random HF models and a tokenizer, in memory.

The models are built in-process (no files, no hub) and small enough that a prefill
over a few hundred tokens takes milliseconds on a CPU. Norm weights and q/k/v biases
are randomised too, because HF initialises them to constants (ones / zeros) that
would let a forward pass that skipped them still match.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 4-layer causal LM: hidden 64, 4 query heads over 2 KV heads, vocab 512, fp32."""
    import transformers

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        # Wide weights keep greedy argmaxes far apart, so kernel-level rounding
        # differences between our forward and HF's cannot flip a token.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="session")
def model_factory() -> Callable[[str], torch.nn.Module]:
    """``factory(arch)``: one cached model per architecture for the whole session."""
    cache: dict[str, torch.nn.Module] = {}

    def factory(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cache[arch] = build_model(arch)
        return cache[arch]

    return factory


@pytest.fixture(scope="session")
def llama_model(model_factory: Callable[[str], torch.nn.Module]) -> torch.nn.Module:
    return model_factory("llama")


@pytest.fixture(scope="session")
def qwen2_model(model_factory: Callable[[str], torch.nn.Module]) -> torch.nn.Module:
    return model_factory("qwen2")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` trained offline on generated sentences.

    Its ``encode`` returns an ``Encoding`` (ids under ``.ids``), the harder of the two
    shapes the task generators accept.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = "the news city report market said year people river court new number".split()
    corpus = [
        " ".join(rng.choice(words) for _ in range(12)) + f" {rng.randrange(10**7)}."
        for _ in range(2000)
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer
