"""
What usage accounting adds to the relay's per-chunk path, in-process (no sockets, so the
number does not depend on what else the machine runs).

Each stream is fed chunk by chunk through a L{StreamAccount}: an Ollama NDJSON stream
(one token line per chunk, then the final line with the counts), an OpenAI SSE stream the
client asked usage for (counted, passed unchanged), and one it did not (the usage event
removed). Reported: nanoseconds per chunk, best of five runs, next to the cost of the
bare loop, and what the proxy spends per relayed line in C{bench/relay.py} for scale.

Run: C{PYTHONPATH=. python bench/usage.py}. Prints a table and writes
C{bench/results/usage.json}.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from twisted.internet.task import Clock

from ollamamq.usage import StreamAccount

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "usage.json")
TOKENS = 20_000


def ollamaStream() -> list[bytes]:
    """
    An Ollama /api/chat stream as chunks.
    """
    chunks = [json.dumps({"model": "llama3", "created_at": "2026-12-01T10:00:00Z",
                          "message": {"role": "assistant", "content": f" tok{i}"},
                          "done": False}).encode() + b"\n" for i in range(TOKENS)]
    chunks.append(json.dumps({"model": "llama3", "done": True, "total_duration": 123,
                              "load_duration": 4, "prompt_eval_count": 26,
                              "eval_count": TOKENS}).encode() + b"\n")
    return chunks


def openaiStream(withUsageNulls: bool) -> list[bytes]:
    """
    An OpenAI chat stream as chunks, ending with a usage event and [DONE].
    """
    def event(payload: dict) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "llama3"}
    chunks = []
    for i in range(TOKENS):
        chunk = dict(base, choices=[{"index": 0, "delta": {"content": f" tok{i}"},
                                     "finish_reason": None}])
        if withUsageNulls:
            chunk["usage"] = None
        chunks.append(event(chunk))
    chunks.append(event(dict(base, choices=[], usage={"prompt_tokens": 26,
                                                      "completion_tokens": TOKENS})))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def timePerChunk(chunks: list[bytes], remove: bool | None) -> float:
    """
    Best-of-five nanoseconds per chunk; C{remove} L{None} is the bare loop.
    """
    best = float("inf")
    for _ in range(5):
        account = StreamAccount(Clock(), removeUsageEvent=bool(remove))
        account.started(sse=True, lengthKnown=False)
        feed = account.feed
        start = time.perf_counter()
        if remove is None:
            for chunk in chunks:
                pass
        else:
            for chunk in chunks:
                feed(chunk)
            account.finish()
        best = min(best, time.perf_counter() - start)
        if remove is not None:
            assert account.usage().completionTokens == TOKENS
    return best / len(chunks) * 1e9


def main() -> None:
    """
    The table and the JSON.
    """
    rows = []
    for name, chunks, remove in (
        ("bare loop", ollamaStream(), None),
        ("Ollama NDJSON, counted", ollamaStream(), False),
        ("OpenAI SSE, client asked usage", openaiStream(True), False),
        ("OpenAI SSE, usage event removed", openaiStream(True), True),
    ):
        rows.append({"stream": name, "ns_per_chunk": round(timePerChunk(chunks, remove))})
    print(f"{'stream':<34} {'ns/chunk':>9}")
    print("-" * 44)
    for row in rows:
        print(f"{row['stream']:<34} {row['ns_per_chunk']:>9,}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump({"benchmark": "usage accounting per chunk", "python": sys.version.split()[0],
                   "implementation": platform.python_implementation(),
                   "machine": platform.machine(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "tokens": TOKENS, "results": rows}, f, indent=2)
        f.write("\n")
    print(f"\nwritten to {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    main()
