"""The trained retrieval model's packaging: int8 weights in, an HF model directory out.

``benchmarks/accuracy/train_retriever.py`` ships its weights as int8 rows with one fp16
scale per row (small enough to live in the repository) and ``real_model.build_retriever``
turns them into the float directory vLLM loads. These tests check that round trip on a
random model of the shipped architecture: the built model computes what the quantised
one does, the build is idempotent and notices new weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.accuracy.real_model import MARKER, build_retriever
from benchmarks.accuracy.train_retriever import (
    ASSET_DIR,
    WEIGHTS_FILE,
    dequantize_int8,
    quantize_int8,
)


def test_int8_round_trip_is_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 48, generator=gen) * 0.05,
             "norm": torch.rand(48, generator=gen) + 0.5}  # fmt: skip
    packed = quantize_int8(state)
    assert packed["w"].dtype == torch.int8 and packed["w.scale"].shape == (64,)
    restored = dequantize_int8(packed, torch.float32)
    assert set(restored) == {"w", "norm"}
    step = packed["w.scale"].float()[:, None]
    assert ((restored["w"] - state["w"]).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(restored["norm"], state["norm"], rtol=1e-3, atol=0)


@pytest.fixture
def random_asset(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """The shipped config and tokenizer with random int8 weights (and the model they
    quantise)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    asset = tmp_path / "asset"
    asset.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET_DIR / name, asset / name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(asset)).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(quantize_int8(state), str(asset / WEIGHTS_FILE))
    model.load_state_dict({**dequantize_int8(quantize_int8(state), torch.float32),
                           "lm_head.weight": state["model.embed_tokens.weight"]})  # fmt: skip
    return asset, model


def test_built_directory_loads_the_quantised_model(random_asset, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asset, quantised = random_asset
    out = build_retriever(tmp_path / "model", asset=asset)
    built = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode("The pass key is 1234567. What is the pass key?", return_tensors="pt")
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        torch.testing.assert_close(built(ids).logits, quantised(ids).logits)
    assert built.config.tie_word_embeddings and built.config.eos_token_id == tokenizer.eos_token_id


def test_build_is_idempotent_and_notices_new_weights(random_asset, tmp_path):
    from safetensors.torch import load_file, save_file

    asset, _ = random_asset
    out = build_retriever(tmp_path / "model", asset=asset)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_retriever(out, asset=asset) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    tensors = load_file(str(asset / WEIGHTS_FILE))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, str(asset / WEIGHTS_FILE))
    before = (out / MARKER).read_text()
    build_retriever(out, asset=asset)
    assert (out / MARKER).read_text() != before


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_retriever train"):
        build_retriever(tmp_path / "model", asset=tmp_path)


def test_training_examples_mark_answers_and_copies():
    from benchmarks.accuracy import train_retriever as tr
    from vllm_fastkv.reference import tasks

    tokenizer = tr.load_tokenizer(ASSET_DIR)
    tr._init_worker(str(ASSET_DIR), str(tasks.DEFAULT_DATA_DIR),
                    tr.chars_per_token(tokenizer, tasks.DEFAULT_DATA_DIR))  # fmt: skip
    for i, task in enumerate(tasks.TASKS):
        example = tr.make_example((task, 1024, tr.TRAIN_SEED_BASE + i))
        assert example is not None, task
        ids, roles = example
        assert len(ids) == len(roles) <= 1024 and ids[0] == tokenizer.bos_token_id
        answer = [t for t, r in zip(ids, roles, strict=True) if r == tr.ANSWER]
        assert answer[-1] == tokenizer.eos_token_id and roles[0] == tr.TEXT
        assert tokenizer.decode(answer[:-1]).endswith(".")
    ids, roles = tr.make_copy_example(512, 3)
    assert len(ids) == len(roles) <= 512
    # The segment (first unsupervised run) comes back after the text; all of the repeat
    # but its first token is supervised.
    segment = [i for i, r in enumerate(roles) if r == tr.IGNORED]
    split = next(k for k in range(1, len(segment)) if segment[k] != segment[k - 1] + 1)
    first, repeat_start = segment[:split], segment[split]
    copied = [i for i, r in enumerate(roles) if r == tr.COPIED]
    assert copied == list(range(repeat_start + 1, repeat_start + len(first)))
    assert [ids[i] for i in first] == ids[repeat_start : repeat_start + len(first)]


def test_curriculum_grows_on_skill_and_on_schedule():
    from benchmarks.accuracy.train_retriever import Curriculum

    lengths = [256, 512, 1024, 2048]
    on_skill = Curriculum(lengths, grow_below=0.3, full_by=0)
    on_skill.update(1.0, progress=0.9)
    assert on_skill.max_len == 256
    on_skill.update(0.2, progress=0.9)
    assert on_skill.max_len == 512
    scheduled = Curriculum(lengths, grow_below=0.3, full_by=0.6)
    scheduled.update(None, progress=0.3)
    assert scheduled.max_len == 512
    scheduled.update(2.0, progress=0.6)
    assert scheduled.max_len == 2048


def test_training_runs_end_to_end(tmp_path):
    """Four CPU steps through the whole script (data workers, loss, export, evaluation),
    resumed from the shipped weights: the first logged losses are a trained model's (a
    random one starts at ~8 nats of text loss and ~2 on the answers)."""
    import json
    import subprocess
    import sys

    asset = tmp_path / "asset"
    asset.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", WEIGHTS_FILE):
        shutil.copy(ASSET_DIR / name, asset / name)
    (asset / WEIGHTS_FILE).touch()
    shipped_mtime = (asset / WEIGHTS_FILE).stat().st_mtime_ns
    model_dir = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy.train_retriever", "train", "--asset",
         str(asset), "--model-dir", str(model_dir), "--steps", "4", "--tokens-per-step",
         "2048", "--max-len", "512", "--workers", "1", "--prefetch", "2", "--log-every", "2",
         "--eval-lengths", "512", "--eval-seeds", "1", "--resume", "--lr", "1e-4"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (asset / WEIGHTS_FILE).stat().st_mtime_ns > shipped_mtime  # exported again
    log = json.loads((model_dir / "training-log.json").read_text())
    assert [entry["step"] for entry in log] == [2, 4]  # a step budget, not a clock one
    assert log[0]["text_loss"] < 5.0 and log[0]["answer_loss"] < 1.0, log[0]
    assert "mean" in json.loads((model_dir / "eval.json").read_text())
