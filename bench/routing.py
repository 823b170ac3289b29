"""
Routing decision cost: how long the proxy spends deciding where a request goes.

Builds a pool of 50 backends with 200 models each (drawn from ~700 realistic names:
Ollama tags, quantisations, Hugging Face GGUF names, OpenAI-style ids), then times
L{BackendPool.choose} and L{ModelCatalog.resolve} per call in several scenarios, prints a
table and writes C{bench/results/routing.json}.

Run: C{PYTHONPATH=. python bench/routing.py [--quick]}
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from ollamamq.backends import OLLAMA, OPENAI, Backend, BackendPool
from ollamamq.config import ModelRule
from ollamamq.models import ModelCatalog, canonicalModel

BACKENDS = 50
MODELS_PER_BACKEND = 200
SEED = 20250101

FAMILIES = [
    "llama3.1", "llama3.2", "llama3.3", "qwen2.5", "qwen2.5-coder", "qwen3", "mistral",
    "mistral-nemo", "mixtral", "gemma2", "gemma3", "phi3", "phi4", "deepseek-r1",
    "deepseek-coder-v2", "codellama", "llava", "starcoder2", "command-r", "granite3.1-dense",
]
SIZES = ["0.5b", "1b", "3b", "7b", "8b", "14b", "32b", "70b"]
QUANTS = ["", "-instruct-q4_K_M", "-instruct-q5_K_M", "-instruct-q8_0", "-instruct-fp16"]
HF = [
    "hf.co/bartowski/{m}-GGUF:Q4_K_M", "hf.co/unsloth/{m}-GGUF:Q8_0",
    "hf.co/lmstudio-community/{m}-GGUF:Q6_K",
]
HF_MODELS = ["Qwen2.5-7B-Instruct", "Llama-3.2-3B-Instruct", "gemma-2-9b-it", "Phi-3.5-mini-instruct"]


def universe() -> list[str]:
    """
    Every model name the simulated backends draw from.
    """
    names = [f"{f}:{s}{q}" for f in FAMILIES for s in SIZES for q in QUANTS]
    names += [t.format(m=m) for t in HF for m in HF_MODELS]
    names += ["nomic-embed-text:latest", "mxbai-embed-large:latest", "all-minilm:latest"]
    return names


def respell(name: str, rng: random.Random) -> str:
    """
    The way one backend might spell a model: sometimes upper-cased parts.
    """
    return name.upper() if rng.random() < 0.05 else name


def buildPool(rng: random.Random) -> tuple[BackendPool, list[str]]:
    """
    A pool of online backends (a fifth OpenAI-compatible), each with a random share of
    the universe, two models loaded and a random load; plus one model every backend has.
    """
    names = universe()
    common = "llama3.1:8b"
    pool = BackendPool()
    for i in range(BACKENDS):
        backend = pool.add(Backend(f"gpu{i}", f"http://gpu{i}:11434", slots=rng.choice([1, 2, 4])))
        models = rng.sample(names, MODELS_PER_BACKEND - 1) + [common]
        kind = OPENAI if i % 5 == 4 else OLLAMA
        pool.markOnline(
            backend, kind, [respell(m, rng) for m in models], rng.sample(models, 2),
            "0.12.0", 0.01,
        )
        backend.active = rng.randrange(0, backend.slots)
    return pool, names


def catalogOf(names: list[str]) -> ModelCatalog:
    """
    A catalog of 30 configured models, 10 of them with two aliases each.
    """
    rules = {}
    for i, name in enumerate(names[:30]):
        aliases = (f"team-{i}-chat", f"GPT-{i}-mini") if i < 10 else ()
        rules[name] = ModelRule(name, aliases=aliases, keepAlive="30m", numCtx=8192)
    return ModelCatalog(rules)


def timeit(call: Callable[[], object], budget: float) -> float:
    """
    Seconds per call: the best of five runs, each about C{budget / 5} seconds long.
    """
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            call()
        elapsed = time.perf_counter() - start
        if elapsed > budget / 50:
            break
        n *= 2
    loops = max(1, int(n * (budget / 5) / elapsed))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(loops):
            call()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def cycling(values: list, fn: Callable) -> Callable[[], object]:
    """
    A call that applies C{fn} to the next of C{values} each time, so one input's cache
    luck does not decide the result.
    """
    state = {"i": 0}
    count = len(values)

    def call() -> object:
        i = state["i"] = (state["i"] + 1) % count
        return fn(values[i])

    return call


def main(argv: list[str]) -> int:
    """
    Run the scenarios, print the table, write the JSON.
    """
    budget = 0.2 if "--quick" in argv else 1.0
    rng = random.Random(SEED)
    pool, names = buildPool(rng)
    catalog = catalogOf(names)
    both = frozenset({OLLAMA, OPENAI})
    ollamaOnly = frozenset({OLLAMA})

    present = sorted({k for b in pool.backends for k in b.models})
    typical = [canonicalModel(n) for n in rng.sample(names, 100)]
    holders = sum(sum(k in b.models for b in pool.backends) for k in typical) / len(typical)
    missing = [f"not-there-{i}:7b" for i in range(100)]

    busyPool, _ = buildPool(random.Random(SEED))
    for backend in busyPool.backends:
        backend.active = backend.slots

    requests = {
        "alias (mixed case)": [f"GPT-{i}-Mini" for i in range(10)],
        "configured model": [n.upper() for n in names[:30]],
        "plain tagged name": rng.sample(names, 100),
        "untagged name": ["llama3", "mistral", "Qwen2.5", "gemma3", "phi4"],
        "hf.co namespaced": [t.format(m=m) for t in HF for m in HF_MODELS],
        "library/ prefixed": [f"library/{n}" for n in rng.sample(names, 50)],
    }

    scenarios: list[tuple[str, str, Callable[[], object]]] = [
        ("choose", "model on all 50 backends", lambda: pool.choose(both, "llama3.1:8b")),
        (
            "choose",
            f"typical model (on ~{holders:.0f} backends)",
            cycling(typical, lambda k: pool.choose(both, k)),
        ),
        (
            "choose",
            "typical model, Ollama API only",
            cycling(typical, lambda k: pool.choose(ollamaOnly, k)),
        ),
        ("choose", "unknown model (full scan, None)", cycling(missing, lambda k: pool.choose(both, k))),
        ("choose", "all backends busy (None)", cycling(typical, lambda k: busyPool.choose(both, k))),
        ("choose", "any model (model=None)", lambda: pool.choose(both, None)),
        ("canServe", "typical model", cycling(typical, lambda k: pool.canServe(both, k))),
        ("canServe", "unknown model", cycling(missing, lambda k: pool.canServe(both, k))),
    ]
    for label, values in requests.items():
        scenarios.append(("resolve", label, cycling(values, catalog.resolve)))
    scenarios.append(("canonicalModel", "plain tagged name", cycling(requests["plain tagged name"], canonicalModel)))
    scenarios.append(
        (
            "resolve+choose",
            "typical request end to end",
            cycling(
                requests["plain tagged name"],
                lambda n: pool.choose(both, catalog.resolve(n).key),
            ),
        )
    )

    results = []
    for operation, scenario, call in scenarios:
        seconds = timeit(call, budget)
        results.append(
            {
                "operation": operation,
                "scenario": scenario,
                "us_per_op": round(seconds * 1e6, 3),
                "ops_per_s": round(1 / seconds),
            }
        )

    width = max(len(r["operation"]) + len(r["scenario"]) for r in results) + 3
    print(
        f"Routing cost: {BACKENDS} backends x {MODELS_PER_BACKEND} models "
        f"({len(present)} distinct), Python {platform.python_version()}"
    )
    print(f"{'operation / scenario':<{width}} {'us/op':>9} {'ops/s':>12}")
    print("-" * (width + 23))
    for r in results:
        label = f"{r['operation']}: {r['scenario']}"
        print(f"{label:<{width}} {r['us_per_op']:>9.2f} {r['ops_per_s']:>12,}")

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "routing.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(
            {
                "benchmark": "routing",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "platform": platform.platform(),
                "backends": BACKENDS,
                "models_per_backend": MODELS_PER_BACKEND,
                "distinct_models": len(present),
                "budget_seconds_per_scenario": budget,
                "results": results,
            },
            f,
            indent=2,
        )
        f.write("\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
