"""Locust load test for vLLM's OpenAI-compatible API, aimed at what FastKV changes.

FastKV cuts prefill work and KV memory for long prompts, so besides short chat the scenarios
send long-document (RAG) prompts and stream, recording time to first token (TTFT) as its own
metric. Works against any vLLM server; see loadtests/README.md for how to run and read it.

Request names in Locust's statistics:

    POST chat:short          /v1/chat/completions, a one-line question
    POST chat:rag            /v1/chat/completions, streamed: long documents + a question
    TTFT chat:rag            ... its time to the first generated text
    POST completion:stream   /v1/completions, streamed continuation of a medium prompt
    TTFT completion:stream   ... its time to the first generated text
    GET  models              /v1/models, once per user when LOADTEST_MODEL is not set

Streamed POST rows time the whole stream, up to ``data: [DONE]``.

User classes (all four run unless named on the command line): ShortChatUser, RagUser,
StreamingUser (one scenario each) and MixedUser (all three, weighted like a chat service).

Settings (environment variables):

    LOADTEST_MODEL                model name; default: the first one /v1/models lists
    LOADTEST_API_KEY              sent as "Authorization: Bearer ..." (vllm serve --api-key)
    LOADTEST_MAX_TOKENS           tokens generated per request (default 128)
    LOADTEST_IGNORE_EOS           generate exactly MAX_TOKENS (vLLM's ignore_eos; default true)
    LOADTEST_RAG_PROMPT_CHARS     document characters per RAG prompt (default 24000, about
                                  6k Llama-3 tokens)
    LOADTEST_STREAM_PROMPT_CHARS  prompt characters of streamed completions (default 4000)
    LOADTEST_RAG_DATA             JSON-lines file whose "context" fields supply documents
                                  (default: LongBench multi_news in the project's shared data;
                                  generated text when the file is absent)
    LOADTEST_WAIT_MIN/MAX         think time between a user's requests, seconds (default 0.5/2)
    LOADTEST_TIMEOUT              per-request timeout, seconds (default 600)
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locust import HttpUser, between

#: LongBench's multi_news, where the project's shared data sits next to the repository.
DEFAULT_RAG_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench" / "multi_news.jsonl"
)
SHORT_QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for writing clear emails.",
    "Explain what a hash table is in one paragraph.",
    "Translate 'good morning' into Spanish and German.",
    "What causes the seasons on Earth?",
    "Write a haiku about autumn rain.",
    "How many minutes are there in a week?",
    "Name two differences between TCP and UDP.",
)
_FILLER_WORDS = (
    "the report council market river city water school company government year people "
    "during after before between under through since while where which their other "
    "announced expected reported according said would could first last new long number"
).split()


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return default if raw is None else raw.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Knobs from LOADTEST_* variables, read once (every Locust process reads the same)."""

    model: str
    api_key: str
    max_tokens: int
    ignore_eos: bool
    rag_prompt_chars: int
    stream_prompt_chars: int
    rag_data: Path
    wait_min: float
    wait_max: float
    timeout: float

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            model=env("LOADTEST_MODEL", ""),
            api_key=env("LOADTEST_API_KEY", ""),
            max_tokens=int(env("LOADTEST_MAX_TOKENS", "128")),
            ignore_eos=_env_bool("LOADTEST_IGNORE_EOS", True),
            rag_prompt_chars=int(env("LOADTEST_RAG_PROMPT_CHARS", "24000")),
            stream_prompt_chars=int(env("LOADTEST_STREAM_PROMPT_CHARS", "4000")),
            rag_data=Path(env("LOADTEST_RAG_DATA", str(DEFAULT_RAG_DATA))),
            wait_min=float(env("LOADTEST_WAIT_MIN", "0.5")),
            wait_max=float(env("LOADTEST_WAIT_MAX", "2")),
            timeout=float(env("LOADTEST_TIMEOUT", "600")),
        )


SETTINGS = Settings.from_env()


# ------------------------------------------------------------------------------ prompts
@functools.cache
def _documents(path: Path) -> tuple[str, ...]:
    """Document texts from a LongBench-style JSON-lines file; () when it is absent."""
    if not path.is_file():
        return ()
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            context = json.loads(line).get("context", "")
            # LongBench's multi_news encodes line breaks as the word NEWLINE_CHAR.
            text = re.sub(r"(\s*NEWLINE_CHAR\s*)+", "\n", context).strip()
            if text:
                docs.append(text)
    return tuple(docs)


def _filler(rng: random.Random, chars: int, passkey: str) -> str:
    """Generated prose of about `chars` characters with one passkey sentence hidden in it."""
    needle = f"The passkey is {passkey}."
    sentences: list[str] = []
    length = len(needle)
    while length < chars:
        words = [rng.choice(_FILLER_WORDS) for _ in range(rng.randint(8, 20))]
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        length += len(sentence) + 1
    sentences.insert(rng.randrange(len(sentences) + 1), needle)
    return " ".join(sentences)


def _truncate(text: str, chars: int) -> str:
    """At most `chars` characters, cut at a word boundary."""
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def long_document(rng: random.Random, chars: int) -> tuple[str, str]:
    """(documents, question) with about `chars` characters of documents.

    A random id opens the documents so that vLLM's prefix cache cannot answer a repeated
    document from cache: every request pays its full prefill, which is what FastKV reduces.
    """
    header = f"Reference id {rng.getrandbits(64):016x}.\n\n"
    docs = _documents(SETTINGS.rag_data)
    if not docs:
        passkey = str(rng.randrange(10_000, 100_000))
        return header + _filler(rng, chars - len(header), passkey), "What is the passkey?"
    parts, length = [], len(header)
    while length < chars:
        doc = rng.choice(docs)
        parts.append(doc)
        length += len(doc) + 2
    body = _truncate("\n\n".join(parts), chars - len(header))
    return header + body, "Summarise the news reported in the documents above in three sentences."


# ------------------------------------------------------------------------------ users
class OpenAIUser(HttpUser):
    """Shared client set-up and request helpers; the scenarios below are its tasks."""

    abstract = True
    wait_time = between(SETTINGS.wait_min, SETTINGS.wait_max)

    def on_start(self) -> None:
        if SETTINGS.api_key:
            self.client.headers["Authorization"] = f"Bearer {SETTINGS.api_key}"
        self.model = SETTINGS.model or self._first_served_model()
        self.rng = random.Random()

    def _first_served_model(self) -> str:
        with self.client.get(
            "/v1/models", name="models", catch_response=True, timeout=SETTINGS.timeout
        ) as resp:
            try:
                return resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError):
                resp.failure(f"cannot read a model id from /v1/models: {resp.text[:200]!r}")
                raise

    def sampling(self) -> dict[str, Any]:
        """Generation settings shared by every request."""
        params: dict[str, Any] = {
            "model": self.model, "max_tokens": SETTINGS.max_tokens, "temperature": 0.7,
        }
        if SETTINGS.ignore_eos:
            params["ignore_eos"] = True  # vLLM: a fixed output length keeps runs comparable
        return params

    def post_json(self, path: str, name: str, body: dict[str, Any]) -> None:
        """A non-streamed request; fails unless it returns 200 with generated tokens."""
        with self.client.post(
            path, json=body, name=name, catch_response=True, timeout=SETTINGS.timeout
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:300]}")
                return
            try:
                payload = resp.json()
                ok = bool(payload["choices"]) and payload["usage"]["completion_tokens"] >= 1
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                resp.failure(f"no completion in response: {resp.text[:300]}")

    def post_stream(self, path: str, name: str, body: dict[str, Any]) -> None:
        """A streamed request: times the whole stream and, separately, the first text (TTFT).

        Fails unless the server answers 200, sends text and ends the stream with [DONE].
        """
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first_text: float | None = None
        done = False
        with self.client.post(
            path, json=body, name=name, stream=True, catch_response=True, timeout=SETTINGS.timeout
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:300]}")
                return
            try:
                for line in resp.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    if first_text is None and _chunk_text(json.loads(data)):
                        first_text = time.perf_counter()
            except (OSError, ValueError) as exc:  # connection dropped, malformed chunk
                resp.failure(f"stream broken: {exc!r}")
                return
            end = time.perf_counter()
            # Locust times a stream=True request to its response headers; a streamed answer's
            # latency runs to its last event.
            resp.request_meta["response_time"] = (end - start) * 1000
            if first_text is None or not done:
                resp.failure("stream ended without text" if done else "stream ended without [DONE]")
                return
        self.environment.events.request.fire(
            request_type="TTFT", name=name, response_time=(first_text - start) * 1000,
            response_length=0, exception=None, context={},
        )


def _chunk_text(chunk: dict[str, Any]) -> str:
    """Generated text in a streamed chunk: completions carry `text`, chat carries `delta`."""
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


def short_chat(user: OpenAIUser) -> None:
    """A one-line question: the latency floor, where FastKV should change nothing."""
    question = user.rng.choice(SHORT_QUESTIONS)
    user.post_json("/v1/chat/completions", "chat:short", {
        **user.sampling(), "messages": [{"role": "user", "content": question}],
    })


def rag_chat(user: OpenAIUser) -> None:
    """Long documents plus a question, streamed: FastKV's target (prefill and KV size)."""
    documents, question = long_document(user.rng, SETTINGS.rag_prompt_chars)
    user.post_stream("/v1/chat/completions", "chat:rag", {
        **user.sampling(),
        "messages": [
            {"role": "system", "content": "Answer using only the documents the user provides."},
            {"role": "user", "content": f"{documents}\n\nQuestion: {question}"},
        ],
    })


def stream_completion(user: OpenAIUser) -> None:
    """A medium prompt continued as a streamed plain completion."""
    text, _ = long_document(user.rng, SETTINGS.stream_prompt_chars)
    user.post_stream("/v1/completions", "completion:stream", {
        **user.sampling(), "prompt": f"{text}\n\nContinue the text:",
    })


class ShortChatUser(OpenAIUser):
    tasks = [short_chat]


class RagUser(OpenAIUser):
    tasks = [rag_chat]


class StreamingUser(OpenAIUser):
    tasks = [stream_completion]


class MixedUser(OpenAIUser):
    """Mostly short chats, some long-document questions and streamed completions."""

    tasks = {short_chat: 6, rag_chat: 2, stream_completion: 2}
