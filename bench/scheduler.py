# -*- test-case-name: tests.test_scheduler -*-
"""
Micro-benchmark of the scheduler's dispatch decision.

A L{Scheduler} on a L{task.Clock} with fake (never contacted) backends is filled with N
queued requests spread over U users while every slot is busy; then, in a steady state, each
step releases the oldest lease, which makes the scheduler pick the next request (one
dispatch decision), and the dispatched user enqueues a new request, so the queue depth
stays at N. The result is dispatch decisions per second (release + decision + lease
callback) and whole cycles per second (plus the re-enqueue), at 10, 1,000 and 10,000
queued requests; the decision cost must not grow with the queue.

Run: C{PYTHONPATH=. python bench/scheduler.py}. Prints a table and writes
C{bench/results/scheduler.json}.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import deque

from twisted.internet import task

from ollamamq.backends import OLLAMA, Backend, BackendPool
from ollamamq.config import Config, UserConfig
from ollamamq.scheduler import Job, Lease, Scheduler

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scheduler.json")

SCENARIOS = [
    # name, queued, users, models, backends, slots per backend
    ("10 queued, 10 users", 10, 10, 1, 4, 2),
    ("1,000 queued, 1,000 users", 1_000, 1_000, 1, 4, 2),
    ("10,000 queued, 1,000 users", 10_000, 1_000, 1, 4, 2),
    ("10,000 queued, 1,000 users, 8 models, 10% VIP", 10_000, 1_000, 8, 8, 2),
]


def runScenario(
    queued: int, users: int, models: int, backends: int, slots: int, steps: int
) -> dict:
    """
    Run one scenario for C{steps} steady-state steps.

    @return: decisions/s, cycles/s and the mean microseconds per decision.
    """
    pool = BackendPool()
    modelNames = [f"m{i}" for i in range(models)]
    for i in range(backends):
        backend = pool.add(Backend(name=f"b{i}", url=f"http://b{i}", slots=slots))
        # Each backend serves two models (or the only one), so classes overlap.
        served = {modelNames[i % models], modelNames[(i + 1) % models]}
        pool.markOnline(backend, OLLAMA, sorted(served))
    userIDs = [f"user{i}" for i in range(users)]
    vips = {u: UserConfig(priority="vip") for u in userIDs[:: 10]} if models > 1 else {}
    config = Config(maxQueuedPerUser=queued + 1, maxQueuedTotal=queued + 10 * backends * slots,
                    users=vips)
    scheduler = Scheduler(pool, task.Clock(), config)
    held: deque[Lease] = deque()
    dispatchedBy: list[str] = []

    def granted(lease: Lease) -> None:
        """
        Hold the lease and note whose it is.
        """
        held.append(lease)
        dispatchedBy.append(lease.job.user)

    def jobFor(n: int, user: str) -> Job:
        """
        The C{n}th job of C{user}, models taken in turn.
        """
        model = modelNames[n % models] + ":latest"
        return Job(user=user, kinds=frozenset({OLLAMA}), model=model)

    total = backends * slots + queued
    for n in range(total):
        scheduler.enqueue(jobFor(n, userIDs[n % users])).addCallback(granted)
    assert scheduler.queued == queued and scheduler.active == backends * slots

    decisionTime = 0.0
    clock = time.perf_counter
    start = clock()
    for n in range(steps):
        t0 = clock()
        held.popleft().release()
        decisionTime += clock() - t0
        # Keep the queue depth: the user just served asks again.
        scheduler.enqueue(jobFor(n, dispatchedBy[-1])).addCallback(granted)
    elapsed = clock() - start
    assert scheduler.queued == queued, scheduler.queued
    assert len(dispatchedBy) == total - queued + steps
    return {
        "decisions_per_second": round(steps / decisionTime),
        "cycles_per_second": round(steps / elapsed),
        "microseconds_per_decision": round(decisionTime / steps * 1e6, 2),
    }


def main(steps: int = 20_000, repeats: int = 3) -> list[dict]:
    """
    Run every scenario C{repeats} times, keep the best run, print a table and write JSON.
    """
    rows = []
    for name, queued, users, models, backends, slots in SCENARIOS:
        runs = [runScenario(queued, users, models, backends, slots, steps) for _ in range(repeats)]
        best = max(runs, key=lambda r: r["decisions_per_second"])
        rows.append(
            {
                "scenario": name,
                "queued": queued,
                "users": users,
                "models": models,
                "backends": backends,
                "slots_per_backend": slots,
                "steps": steps,
                **best,
            }
        )
    header = f"{'scenario':<48} {'decisions/s':>12} {'us/decision':>12} {'cycles/s':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['scenario']:<48} {row['decisions_per_second']:>12,} "
            f"{row['microseconds_per_decision']:>12} {row['cycles_per_second']:>10,}"
        )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(
            {
                "benchmark": "scheduler dispatch decisions",
                "python": sys.version.split()[0],
                "implementation": platform.python_implementation(),
                "machine": platform.machine(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "results": rows,
            },
            f,
            indent=2,
        )
        f.write("\n")
    print(f"\nwritten to {os.path.relpath(RESULTS)}")
    return rows


if __name__ == "__main__":
    main()
