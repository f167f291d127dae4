"""Generate small random-weight models that vLLM can load offline.

No model hub is reachable from CI or from air-gapped machines, so tests and the
default ``scripts/serve.sh`` build their model here: a transformers config, random
weights (seeded, so every run builds the same model), and a byte-level BPE tokenizer
trained on generated text, with a chat template so ``/v1/chat/completions`` works.

    python -m vllm_fastkv.tiny_model OUT_DIR [--arch llama|qwen2] [--layers 4]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
_WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which "
    "this be has had not but it they their one all its new after also first two been "
    "more who time people year city said would over about state could when other into "
    "there than some only most may can many then world part during these made between "
    "under such where while long through both since last three being well before each "
    "report news market river house court water music school council company government "
    "number passkey needle secret value key remember answer question document context "
    "alpha beta gamma delta zero one two three four five six seven eight nine ten"
).split()


def _training_corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 25))]
        corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
        corpus.append(" ".join(str(rng.randint(0, 99999)) for _ in range(3)))
    return corpus


def build_tokenizer(out_dir: Path, vocab_size: int = 1024, seed: int = 0):
    """Train a byte-level BPE tokenizer (no unknown tokens), save it and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 8192,
    seed: int = 0,
) -> Path:
    """Write a loadable model directory (config, safetensors weights, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, seed=seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        # Wide initialisation keeps the random model's logits well separated, so greedy
        # decoding does not hinge on last-bit differences between attention kernels.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    if arch == "llama":
        config = LlamaConfig(head_dim=hidden_size // num_heads, **common)
        model_cls = LlamaForCausalLM
    elif arch == "qwen2":
        config = Qwen2Config(**common)
        model_cls = Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r} (llama|qwen2)")
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build_tiny_model(
        args.out_dir,
        arch=args.arch,
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        seed=args.seed,
    )
    print(path)


if __name__ == "__main__":
    main()
