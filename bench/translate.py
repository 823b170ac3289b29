"""
Translation cost: how much CPU the proxy spends translating a streamed answer, per chunk,
and how much it holds while doing it.

Feeds a synthetic OpenAI chat completion stream (one token per SSE event, as
llama-server sends them, with a usage chunk and C{[DONE]}) through the Ollama NDJSON and
the Anthropic Messages translators, in network-sized pieces, and times it; also the
whole-answer translation of a 1,000-token completion. Prints a table and writes
C{bench/results/translate.json}.

Run: C{PYTHONPATH=. python bench/translate.py [--quick]}
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import tracemalloc
from datetime import datetime, timezone

from twisted.internet.task import Clock

from ollamamq.translate.anthropic_openai import MessagesStream, MessagesWhole
from ollamamq.translate.ollama_openai import OllamaStream, OllamaWhole


def stream(tokens: int) -> bytes:
    """
    An OpenAI chat completion stream of C{tokens} one-word tokens.
    """
    events = []
    for i in range(tokens):
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": f" word{i % 97}"}, "finish_reason": None}]}
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    events.append(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
    events.append(b'data: {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": %d}}\n\n'
                  % tokens)
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def timeStream(make, data: bytes, size: int, tokens: int, rounds: int) -> dict:
    parts = pieces(data, size)
    best = float("inf")
    for _ in range(rounds):
        translator = make()
        started = time.perf_counter()
        for part in parts:
            translator.feed(part)
        translator.finish()
        best = min(best, time.perf_counter() - started)
    tracemalloc.start()
    translator = make()
    peak = 0
    for part in parts:
        translator.feed(part)
        peak = max(peak, tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    return {"chunks_per_s": round(tokens / best), "us_per_chunk": round(best / tokens * 1e6, 2),
            "held_bytes_peak": peak}


def main() -> None:
    quick = "--quick" in sys.argv
    tokens = 2000 if quick else 20000
    rounds = 3 if quick else 5
    clock = Clock()
    data = stream(tokens)
    results = {}
    for piece in (64, 1500):
        results[f"ollama_ndjson_{piece}B"] = timeStream(
            lambda: OllamaStream("m", clock, 0, "chat"), data, piece, tokens, rounds)
        results[f"anthropic_sse_{piece}B"] = timeStream(
            lambda: MessagesStream("m"), data, piece, tokens, rounds)
    whole = json.dumps({"id": "x", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": " word" * 1000}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1000}}).encode()
    for name, make in (("ollama_whole", lambda: OllamaWhole("m", clock, 0, "chat")),
                       ("anthropic_whole", lambda: MessagesWhole("m"))):
        started = time.perf_counter()
        for _ in range(200):
            make().translate(200, whole)
        results[name] = {"us_per_answer": round((time.perf_counter() - started) / 200 * 1e6, 1)}
    print(f"{'translation':<24}{'chunks/s':>12}{'us/chunk':>10}{'held peak B':>13}")
    for name, r in results.items():
        if "chunks_per_s" in r:
            print(f"{name:<24}{r['chunks_per_s']:>12}{r['us_per_chunk']:>10}{r['held_bytes_peak']:>13}")
        else:
            print(f"{name:<24}{'':>12}{r['us_per_answer']:>10} us per 1,000-token answer")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "translate.json"), "w") as f:
        json.dump({"when": datetime.now(timezone.utc).isoformat(), "python": platform.python_version(),
                   "tokens": tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
