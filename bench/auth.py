"""
What authentication and rate limiting cost per request, in process: the access gate's
work without the HTTP parsing around it.

Times, per call: L{IdentityResolver.authenticate} with a valid key among 10 and among
10,000 keys, and with an unknown key (the 401 path); L{RateLimiter.check} over 10 and
100,000 users; and the whole gate (repeat and query checks, authentication, rate) for a
keyed request. Prints a table and writes C{bench/results/auth.json}.

Run: C{PYTHONPATH=. python bench/auth.py [--quick]}
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from ollamamq.access import AccessGate
from ollamamq.config import Config, UserConfig
from ollamamq.errors import Unauthorized
from ollamamq.identity import IdentityResolver
from ollamamq.limits import RateLimiter


def perCall(fn: Callable[[], object], calls: int) -> float:
    """
    Microseconds per call of C{fn}, best of three runs of C{calls}.
    """
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def config(keys: int) -> Config:
    """
    A config with C{keys} users of one key each, auth required.
    """
    users = {f"user{i}": UserConfig(keys=(f"sk-user-{i:06d}",)) for i in range(keys)}
    return Config(users=users, auth="required", maxRequestsPerMinute=1_000_000)


def main(argv: list[str]) -> int:
    calls = 2_000 if "--quick" in argv else 20_000
    results = []

    def record(operation: str, scenario: str, micros: float) -> None:
        results.append({"operation": operation, "scenario": scenario,
                        "us_per_call": round(micros, 3)})

    for keys in (10, 10_000):
        identity = IdentityResolver(config(keys))
        good = Headers({b"authorization": [b"Bearer sk-user-000007"]})
        bad = Headers({b"authorization": [b"Bearer sk-user-nope"]})
        record("authenticate", f"valid key, {keys} keys",
               perCall(lambda: identity.authenticate(good, "10.0.0.1"), calls))

        def refused() -> None:
            try:
                identity.authenticate(bad, "10.0.0.1")
            except Unauthorized:
                pass

        record("authenticate", f"unknown key (401), {keys} keys", perCall(refused, calls))

    for users in (10, 100_000):
        clock = Clock()
        limiter = RateLimiter(clock, Config(maxRequestsPerMinute=1_000_000))
        names = [f"user{i}" for i in range(users)]
        position = [0]

        def check() -> None:
            position[0] = (position[0] + 1) % users
            limiter.check(names[position[0]])
            clock.advance(0.0001)

        record("rate check", f"{users} users", perCall(check, calls))

    cfg = config(10)
    identity = IdentityResolver(cfg)
    gate = AccessGate(None, identity, RateLimiter(Clock(), cfg))

    def gateOnce() -> None:
        request = DummyRequest([b"api", b"chat"])
        request.path = b"/api/chat"
        request.uri = b"/api/chat"
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer sk-user-000003"])
        gate._check(request)

    def dummyOnly() -> None:
        request = DummyRequest([b"api", b"chat"])
        request.path = b"/api/chat"
        request.uri = b"/api/chat"
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer sk-user-000003"])

    record("access gate", "keyed request (less building the request)",
           perCall(gateOnce, calls) - perCall(dummyOnly, calls))

    width = max(len(r["operation"]) + len(r["scenario"]) for r in results) + 3
    print(f"ollamamq bench/auth.py, {calls} calls per run, Python {platform.python_version()}")
    for r in results:
        print(f"{r['operation'] + ': ' + r['scenario']:<{width}} {r['us_per_call']:8.2f} µs")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "auth.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "calls": calls,
            "results": results,
        }, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
