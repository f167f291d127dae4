"""Train the accuracy model: a small Llama that retrieves from long context.

No model hub is reachable and the one pretrained LM the package registries ship
(SmolLM2-135M, ``real_model.py``) solves about a quarter of the long-context grid with
full KV, too weak to tell what KV compression costs. This script trains, on one GPU in
minutes, a Llama-architecture model (8 layers, hidden 256, 4 query / 2 KV heads of 64:
grouped-query attention like the models FastKV targets) on the English LongBench
``multi_news`` text with the seeded tasks of :mod:`vllm_fastkv.reference.tasks`
(passkey, needle-in-a-haystack variants, variable tracking) at 256-16K tokens, so that
with full KV it solves them, and FastKV's accuracy is measured against a model that
actually retrieves. Training seeds start at ``TRAIN_SEED_BASE``; evaluations use small
seeds, so no evaluated prompt was seen in training.

Two steps, both reproducible:

    # CPU, seconds: the byte-level BPE tokenizer (4,096 ids, digits split one by one)
    python -m benchmarks.accuracy.train_retriever tokenizer --asset benchmarks/accuracy/retriever
    # GPU, minutes: train, check on held-out seeds, write the shipped weights
    python -m benchmarks.accuracy.train_retriever train --asset benchmarks/accuracy/retriever \\
        --data-dir DIR --minutes 7 --model-dir /tmp/retriever

The asset directory holds what ships with the project (``config.json``, the tokenizer,
``model-int8.safetensors``: every matrix as int8 rows with one fp16 scale per row, ~8 MB,
so the repository stays small enough to travel with the GPU bundle).
``real_model.build_retriever`` turns it into an HF model directory that vLLM loads.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

from vllm_fastkv.reference import tasks

ASSET_DIR = Path(__file__).resolve().parent / "retriever"
WEIGHTS_FILE = "model-int8.safetensors"
VOCAB_SIZE = 4096
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
#: Training prompts use seeds from here on; evaluations use 0, 1, 2, ...
TRAIN_SEED_BASE = 1_000_000
#: Prompt lengths trained on (tokens); every step uses one, at ~TOKENS_PER_STEP tokens.
BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)
TOKENS_PER_STEP = 1 << 18
#: Pseudo task name of the synthetic copy rows (:func:`make_copy_example`).
COPY = "copy"
#: Their segments draw from the ids below this: bytes (digits, letters) and early merges.
COPY_VOCAB = 512
#: What the loss does with each target token (the per-token ``roles`` of an example).
TEXT, ANSWER, COPIED, IGNORED = 0, 1, 2, 3
#: The model: small enough to train in minutes and to ship as ~8 MB of int8.
MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": max(BUCKETS),
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(asset: Path, data_dir: Path) -> Any:
    """Train the BPE tokenizer on the haystack text and the task templates; save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Digits one by one (as Llama-3 and SmolLM2 do): a 7-digit value is 7 ids, so copying
    # it is the same skill at every value.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(_tokenizer_corpus(data_dir), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=max(BUCKETS),
    )  # fmt: skip
    asset.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(asset)
    config = {
        **MODEL_CONFIG,
        "bos_token_id": bos_id,
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
    }
    (asset / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return fast


def haystack_sentences(data_dir: Path) -> tuple[str, ...]:
    """The filler sentences the tasks draw from ``data_dir`` (LongBench ``multi_news``), or,
    where the file is missing, as many of the tasks' own generated ones."""
    path = data_dir / tasks.MULTI_NEWS
    if path.is_file():
        return tasks._multi_news_sentences(path)
    generated = tasks._generated_sentences(random.Random(0))
    return tuple(next(generated) for _ in range(20_000))


def _tokenizer_corpus(data_dir: Path) -> list[str]:
    """Haystack sentences plus short task prompts (their fixed phrases become tokens)."""
    text = list(haystack_sentences(data_dir))

    class Chars:  # sizes prompts by characters: the tokenizer does not exist yet
        def encode(self, s: str) -> list[int]:
            return list(range(len(s) // 4))

    for seed in range(200):
        for generate in tasks.TASKS.values():
            text.append(generate(Chars(), 600, seed=seed, data_dir=data_dir).prompt)
    return text


def load_tokenizer(asset: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset)


# ----------------------------------------------------------------------------- data
class _ApproxTokens:
    """Sizes a prompt by characters (``chars_per_token``), so building it costs one real
    tokenisation instead of a binary search of them."""

    def __init__(self, chars_per_token: float) -> None:
        self.chars_per_token = chars_per_token

    def encode(self, text: str) -> range:
        return range(math.ceil(len(text) / self.chars_per_token))


def answer_text(answer: str | list[str]) -> str:
    """The continuation a task's answer prefix expects: `` 1234567.`` or `` a, b, c.``."""
    values = [answer] if isinstance(answer, str) else answer
    return " " + ", ".join(values) + "."


_WORKER: dict[str, Any] = {}


def _init_worker(asset: str, data_dir: str, chars_per_token: float) -> None:
    _WORKER["tokenizer"] = load_tokenizer(Path(asset))
    _WORKER["approx"] = _ApproxTokens(chars_per_token)
    _WORKER["data_dir"] = data_dir
    _WORKER["sentences"] = haystack_sentences(Path(data_dir))


def make_example(spec: tuple[str, int, int]) -> tuple[list[int], bytes] | None:
    """``(task, length, seed)`` -> (token ids with answer and EOS, per-token roles) or None.

    The roles are ``TEXT`` for the prompt and ``ANSWER`` for the answer and EOS. Depth,
    and the needle counts of the multi-needle tasks, vary with the seed around the
    evaluated defaults, so the model learns the skill, not one layout.
    """
    task, length, seed = spec
    if task == COPY:
        return make_copy_example(length, seed)
    rng = random.Random(seed)
    kwargs: dict[str, Any] = {"depth": rng.random()}
    if task == "niah_multikey":
        kwargs["num_distractors"] = rng.randint(1, 5)
    elif task == "niah_multivalue":
        kwargs["num_values"] = rng.randint(2, 5)
    elif task == "niah_multiquery":
        kwargs["num_queries"] = rng.randint(2, 5)
    elif task == "variable_tracking":
        kwargs["num_hops"] = rng.randint(2, 5)
        kwargs["num_chains"] = rng.randint(1, 3)
    tokenizer = _WORKER["tokenizer"]
    for fill in (0.96, 0.88, 0.75):  # denser text than average overflows: fill less
        try:
            sample = tasks.TASKS[task](
                _WORKER["approx"],
                int(length * fill) - 16,
                seed=seed,
                data_dir=_WORKER["data_dir"],
                **kwargs,
            )
        except ValueError:  # instructions alone exceed a short bucket
            return None
        answer = sample.answer
        if task == "niah_multivalue":  # scored in any order; the text's order is learnable
            answer = sorted(answer, key=sample.prompt.index)
        prompt = tokenizer.encode(sample.prompt)
        answer_ids = tokenizer.encode(answer_text(answer), add_special_tokens=False)
        ids = prompt + answer_ids + [tokenizer.eos_token_id]
        if len(ids) <= length:
            return ids, bytes([TEXT] * len(prompt) + [ANSWER] * (len(ids) - len(prompt)))
    return None


def make_copy_example(length: int, seed: int) -> tuple[list[int], bytes]:
    """A random-token segment, haystack text, the same segment again: the induction task.

    Retrieval needs induction heads (attend to the token after an earlier occurrence of
    the current one, copy it), and the task loss alone does not grow them: the answer is
    a few tokens per thousands, so the run that trained on the tasks only kept its answer
    loss at chance. The repeat of a random segment can be predicted in no other way, and
    it is a dense signal (an eighth to a quarter of the row), so the heads need not wait
    for the rare answer tokens; the tasks then only have to learn which span to copy. Text
    before and between the two copies makes the copy reach over haystack text from a
    varying distance, as retrieval does. The repeat is ``COPIED`` from its second token
    on; the first occurrence and the repeat's first token cannot be predicted and are
    ``IGNORED``.
    """
    rng = random.Random(seed)
    tokenizer, sentences = _WORKER["tokenizer"], _WORKER["sentences"]
    segment = [rng.randrange(3, COPY_VOCAB) for _ in range(rng.randint(length // 8, length // 4))]
    room = length - 1 - 2 * len(segment)
    text, index = "", rng.randrange(len(sentences))
    while len(text) < room * _WORKER["approx"].chars_per_token * 1.2:
        text += " " + sentences[index % len(sentences)]
        index += 1
    haystack = tokenizer.encode(text.strip(), add_special_tokens=False)[:room]
    split = rng.randint(0, len(haystack))  # text before the segment: the copy distance varies
    before, gap = haystack[:split], haystack[split:]
    ids = [tokenizer.bos_token_id, *before, *segment, *gap, *segment]
    roles = [TEXT] * (1 + len(before)) + [IGNORED] * len(segment) + [TEXT] * len(gap)
    roles += [IGNORED] + [COPIED] * (len(segment) - 1)
    return ids, bytes(roles)


def chars_per_token(tokenizer: Any, data_dir: Path) -> float:
    """Characters per token of the haystack text, from a sample of sentences."""
    text = " ".join(haystack_sentences(data_dir)[:2000])
    return len(text) / len(tokenizer.encode(text, add_special_tokens=False))


# ----------------------------------------------------------------------------- weights
def quantize_int8(state: dict[str, Any]) -> dict[str, Any]:
    """Matrices to int8 rows with one fp16 scale each (``name`` + ``.scale``); vectors fp16."""
    import torch

    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().float().cpu()
        if tensor.dim() == 2:
            # The fp16 scale that ships is the one the codes are rounded against.
            scale = (tensor.abs().amax(dim=1).clamp(min=1e-4) / 127.0).half()
            codes = torch.round(tensor / scale.float()[:, None]).clamp(-127, 127)
            out[name] = codes.to(torch.int8)
            out[name + ".scale"] = scale
        else:
            out[name] = tensor.half()
    return out


def dequantize_int8(tensors: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Inverse of :func:`quantize_int8` (up to the rounding), in ``dtype``."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".scale"):
            continue
        scale = tensors.get(name + ".scale")
        value = tensor.float() * scale.float()[:, None] if scale is not None else tensor.float()
        out[name] = value.to(dtype).contiguous()
    return out


def load_shipped_weights(model: Any, asset: Path) -> None:
    """Start from the int8 weights in ``asset`` (``--resume``): a run continues the
    shipped model instead of starting again, so device minutes add up across runs."""
    import torch
    from safetensors.torch import load_file

    path = asset / WEIGHTS_FILE
    if not path.is_file():
        raise SystemExit(f"--resume: no weights at {path}")
    state = dequantize_int8(load_file(str(path)), torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The output matrix is tied to the embedding, so it is not stored.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"--resume: {path} does not fit the model config "
                         f"(missing {missing}, unexpected {unexpected})")


def load_model(model_dir: Path, device: str, dtype: Any) -> Any:
    from transformers import LlamaForCausalLM

    return (
        LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        .to(device)
        .eval()
    )


# ----------------------------------------------------------------------------- training
def _loss(model: Any, batch: Any, roles: Any, text_weight: float) -> tuple[Any, Any]:
    """Mean next-token loss on the answers, plus the same on the copied segments, plus
    ``text_weight`` x mean loss on the prompts; and the sums and counts behind the means.

    The answers are a few dozen of a prompt's thousands of tokens; weighting the means
    separately keeps retrieval from drowning in language modelling of the haystack. A
    batch without copy rows contributes nothing to the copy mean (not a NaN).
    """
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=batch[:, :-1]).logits.float()
    losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    sums, counts = [], []
    for role in (ANSWER, COPIED, TEXT):
        mask = roles[:, 1:] == role
        sums.append((losses * mask).sum())
        counts.append(mask.sum())
    sums_t, counts_t = torch.stack(sums), torch.stack(counts)
    means = sums_t / counts_t.clamp(min=1)
    loss = means[0] + means[1] + text_weight * means[2]
    return loss, torch.stack([sums_t.detach(), counts_t.float()])


def _specs(
    rng: random.Random, length: int, count: int, copy_frac: float
) -> list[tuple[str, int, int]]:
    names = list(tasks.TASKS)
    return [
        (COPY if rng.random() < copy_frac else rng.choice(names), length,
         TRAIN_SEED_BASE + rng.randrange(1 << 40))
        for _ in range(count)
    ]  # fmt: skip


class Curriculum:
    """Prompt lengths that grow with the skill: every step's length is drawn up to a
    maximum, which doubles once the answer loss at it falls below ``grow_below``.

    The answer is one span among all the prompt's tokens, so the signal that teaches
    retrieval is weakest at long prompts: the run that mixed in 16K prompts after a
    fixed tenth of its time never learnt to retrieve at any length. Short prompts first,
    then each doubling only has to stretch a skill the model already has. Half the steps
    are at the current maximum (where the skill is missing), half spread uniformly over
    the shorter lengths (so it is kept there).
    """

    def __init__(self, lengths: list[int], grow_below: float, full_by: float) -> None:
        self.lengths, self.grow_below, self.full_by, self.level = lengths, grow_below, full_by, 0

    @property
    def max_len(self) -> int:
        return self.lengths[self.level]

    def sample(self, rng: random.Random) -> int:
        if self.level == 0 or rng.random() < 0.5:
            return self.max_len
        return rng.choice(self.lengths[: self.level])

    def update(self, answer_loss_at_max: float | None, progress: float) -> None:
        """Grow on skill, and at the latest on schedule: the longest length by
        ``full_by`` of the run, so a run whose loss stalls still trains every length."""
        top = len(self.lengths) - 1
        learnt = answer_loss_at_max is not None and answer_loss_at_max < self.grow_below
        due = min(top, int(progress / self.full_by * top)) if self.full_by > 0 else 0
        self.level = min(top, max(self.level + learnt, due))


def train(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    asset, data_dir = Path(args.asset), Path(args.data_dir)
    tokenizer = load_tokenizer(asset)
    config = LlamaConfig.from_pretrained(asset)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(config)
    if args.resume:
        load_shipped_weights(model, asset)
    model = model.to(device)
    model.config._attn_implementation = "sdpa"
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda"
    )
    cpt = chars_per_token(tokenizer, data_dir)
    pool = multiprocessing.get_context("spawn").Pool(
        args.workers, initializer=_init_worker, initargs=(str(asset), str(data_dir), cpt)
    )
    lengths = sorted({min(b, args.max_len) for b in BUCKETS if b >= args.start_len})
    curriculum = Curriculum(lengths, args.grow_below, args.full_length_by)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + 60 * args.minutes
    start = time.monotonic()
    pending: collections.deque = collections.deque()

    def submit() -> None:
        length = curriculum.sample(rng)
        count = max(1, args.tokens_per_step // length) * 5 // 4
        specs = _specs(rng, length, count, args.copy_frac)
        pending.append((length, pool.map_async(make_example, specs)))

    for _ in range(args.prefetch):
        submit()
    step, seen_tokens, log = 0, 0, []
    stats: dict[int, Any] = {}  # length -> loss sums and counts since the last log
    model.train()
    while step < args.steps if args.steps else time.monotonic() < deadline:
        # The schedule follows whichever budget bounds the run: a fixed step count makes a
        # short run (a test on a loaded machine) do the same work however slow the machine.
        elapsed = (time.monotonic() - start) / (deadline - start)
        progress = step / args.steps if args.steps else elapsed
        length, result = pending.popleft()
        submit()
        rows = max(1, args.tokens_per_step // length)
        examples = [e for e in result.get() if e is not None][:rows]
        batch = torch.full((len(examples), length), tokenizer.pad_token_id, dtype=torch.long)
        roles = torch.full_like(batch, IGNORED, dtype=torch.uint8)
        for row, (ids, example_roles) in enumerate(examples):
            batch[row, : len(ids)] = torch.tensor(ids)
            roles[row, : len(ids)] = torch.frombuffer(bytearray(example_roles), dtype=torch.uint8)
        seen_tokens += int((roles != IGNORED).sum())
        batch, roles = batch.to(device, non_blocking=True), roles.to(device, non_blocking=True)
        warmup = min(1.0, (step + 1) / args.warmup_steps)
        lr = args.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, step_stats = _loss(model, batch, roles, args.text_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        stats[length] = stats[length] + step_stats if length in stats else step_stats
        if step % args.log_every == 0:
            per_length = {n: (t[0] / t[1].clamp(min=1)).tolist() for n, t in stats.items()}
            total = sum(stats.values())
            answer, copied, text = (total[0] / total[1].clamp(min=1)).tolist()
            entry = {
                "step": step,
                "s": round(time.monotonic() - start, 1),
                "max_len": curriculum.max_len,
                "tokens": seen_tokens,
                "lr": round(lr, 6),
                "answer_loss": round(answer, 4),
                "copy_loss": round(copied, 4),
                "text_loss": round(text, 4),
                "answer_by_len": {n: round(v[0], 3) for n, v in sorted(per_length.items())},
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
            seen_at_max = curriculum.max_len in stats and float(stats[curriculum.max_len][1, 0]) > 0
            curriculum.update(per_length[curriculum.max_len][0] if seen_at_max else None, progress)
            stats.clear()
    pool.terminate()
    print(
        f"trained {step} steps, {seen_tokens / 1e6:.1f}M tokens in "
        f"{time.monotonic() - start:.0f} s, reached {curriculum.max_len} tokens",
        flush=True,
    )
    export(model, asset, Path(args.model_dir))
    (Path(args.model_dir) / "training-log.json").write_text(json.dumps(log) + "\n")
    evaluate(Path(args.model_dir), data_dir, args.eval_lengths, args.eval_seeds)


def export(model: Any, asset: Path, model_dir: Path) -> None:
    """Write the shipped int8 weights into ``asset`` and the HF model built from them."""
    from safetensors.torch import save_file

    from benchmarks.accuracy.real_model import build_retriever

    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(quantize_int8(state), str(asset / WEIGHTS_FILE))
    build_retriever(model_dir, asset=asset, force=True)


# ----------------------------------------------------------------------------- evaluation
def evaluate(model_dir: Path, data_dir: Path, lengths: list[int], seeds: int) -> dict:
    """Greedy exact match with full KV in transformers on held-out seeds (a quick check;
    the harness measures through vLLM)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device, torch.bfloat16 if device == "cuda" else torch.float32)
    scores: dict[str, list[float]] = collections.defaultdict(list)
    for task, generate in tasks.TASKS.items():
        for length in lengths:
            for seed in range(seeds):
                sample = generate(
                    tokenizer, length - 48, depth=(seed % 5 + 0.5) / 5, seed=seed, data_dir=data_dir
                )
                ids = torch.tensor([tokenizer.encode(sample.prompt)], device=device)
                with torch.no_grad():
                    out = model.generate(
                        ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id
                    )
                reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                scores[f"{task}@{length}"].append(tasks.score_exact_match(reply, sample.answer))
    summary = {key: sum(v) / len(v) for key, v in scores.items()}
    summary["mean"] = sum(summary.values()) / len(summary)
    print("EVAL " + json.dumps(summary), flush=True)
    (model_dir / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train the tokenizer, write config + tokenizer")
    tok.add_argument("--asset", default=str(ASSET_DIR))
    tok.add_argument("--data-dir", default=str(tasks.DEFAULT_DATA_DIR))
    tr = sub.add_parser("train", help="train the model, write the int8 weights")
    tr.add_argument("--asset", default=str(ASSET_DIR))
    tr.add_argument("--data-dir", default=str(tasks.DEFAULT_DATA_DIR))
    tr.add_argument("--model-dir", default="/tmp/fastkv-retriever")
    tr.add_argument("--minutes", type=float, default=7.0)
    tr.add_argument("--steps", type=int, default=0,
                    help="train exactly this many steps instead of for --minutes (0: by time)")
    tr.add_argument("--resume", action="store_true",
                    help="continue from the weights in --asset instead of random ones")
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--warmup-steps", type=int, default=100)
    tr.add_argument("--text-weight", type=float, default=0.3)
    tr.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP)
    tr.add_argument("--start-len", type=int, default=min(BUCKETS))
    tr.add_argument("--max-len", type=int, default=max(BUCKETS))
    tr.add_argument(
        "--grow-below",
        type=float,
        default=0.3,
        help="double the prompt length once the answer loss at it is below this",
    )
    tr.add_argument(
        "--full-length-by",
        type=float,
        default=0.6,
        help="fraction of the run by which the curriculum reaches --max-len even if the "
        "answer loss has not fallen (0: only on skill)",
    )
    tr.add_argument(
        "--copy-frac",
        type=float,
        default=0.25,
        help="share of training rows that are the synthetic copy task",
    )
    tr.add_argument("--workers", type=int, default=12)
    tr.add_argument("--prefetch", type=int, default=6)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--log-every", type=int, default=25)
    tr.add_argument("--eval-lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    tr.add_argument("--eval-seeds", type=int, default=5)
    ev = sub.add_parser("eval", help="quick full-KV check of a built model directory")
    ev.add_argument("--model-dir", default="/tmp/fastkv-retriever")
    ev.add_argument("--data-dir", default=str(tasks.DEFAULT_DATA_DIR))
    ev.add_argument("--eval-lengths", type=int, nargs="+", default=[2048, 8192])
    ev.add_argument("--eval-seeds", type=int, default=5)
    args = p.parse_args()
    if args.command == "tokenizer":
        build_tokenizer(Path(args.asset), Path(args.data_dir))
    elif args.command == "train":
        train(args)
    else:
        evaluate(Path(args.model_dir), Path(args.data_dir), args.eval_lengths, args.eval_seeds)


if __name__ == "__main__":
    main()
