"""
Does logging every request slow dispatch? 100,000 requests through the scheduler, each
one reported as the proxy reports a finished request (metrics + request log + access line
event), with the request log on a real store (SQLite in WAL mode, on its own thread),
compared with the same run reporting nothing.

The scheduler runs on the real reactor with four fake backends of two slots and 1,000
requests queued over 100 users; each step releases the oldest lease (one dispatch
decision) and the served user asks again. Steps run in batches of 500 per reactor turn,
so the store's thread writes batches while the reactor dispatches, as in the daemon.
Reported: dispatch cycles per second over the whole run and over its last 10,000 steps
(with 90,000 rows already in the table), the microseconds of the dispatch itself (release,
decision, lease callback) over the first and the last 10,000 steps, microseconds of
reporting per request on the reactor thread, the time the store needed after the last request to have every row on
disk, and the time of a C{/proxy/usage} query (group by user) over the 100,000 rows.

Run: C{PYTHONPATH=. python bench/requestlog.py [--requests 100000]}. Prints a table and
writes C{bench/results/requestlog.json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import deque
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogBeginner, textFileLogObserver

from ollamamq.backends import OLLAMA, Backend, BackendPool
from ollamamq.config import Config
from ollamamq.metrics import Metrics
from ollamamq.requestlog import RequestLog, RequestRecord, usageTotals
from ollamamq.scheduler import Job, Lease, Scheduler
from ollamamq.store import Store
from ollamamq.tracking import Observer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "requestlog.json")
QUEUED, USERS, BATCH, TAIL = 1_000, 100, 500, 10_000


async def run(requests: int, logged: bool) -> dict[str, Any]:
    """
    One run: C{requests} dispatch cycles, reported (C{logged}) or not.
    """
    pool = BackendPool()
    for i in range(4):
        backend = pool.add(Backend(name=f"b{i}", url=f"http://b{i}", slots=2))
        pool.markOnline(backend, OLLAMA, ["llama3"])
    config = Config(maxQueuedPerUser=QUEUED + 1, maxQueuedTotal=QUEUED + 100,
                    maxUsers=USERS * 2)
    scheduler = Scheduler(pool, reactor, config)
    directory = tempfile.mkdtemp()
    store = Store(os.path.join(directory, "state.db"), reactor, reactor)
    store.start()
    metrics = Metrics(scheduler, pool, processMetrics=False)
    requestLog = RequestLog(store.runInteraction, reactor, retentionDays=None)
    observer = Observer(reactor, metrics, requestLog)
    requestLog.startService()
    held: deque[Lease] = deque()
    users = [f"user{i}" for i in range(USERS)]

    def job(n: int) -> Job:
        return Job(user=users[n % USERS], kinds=frozenset({OLLAMA}), model="llama3:latest",
                   requestId=f"r{n}")

    for n in range(QUEUED + 8):
        scheduler.enqueue(job(n)).addCallback(held.append)
    reportTime = dispatchFirst = dispatchLast = 0.0
    clock = time.perf_counter
    start = clock()
    tailStart = None
    n = 0
    while n < requests:
        for _ in range(min(BATCH, requests - n)):
            if n == requests - TAIL:
                tailStart = clock()
            t0 = clock()
            lease = held.popleft()
            lease.release()
            spent = clock() - t0
            if n < TAIL:
                dispatchFirst += spent
            elif n >= requests - TAIL:
                dispatchLast += spent
            if logged:
                t0 = clock()
                observer.report(RequestRecord(
                    time=time.time(), requestId=lease.job.requestId, user=lease.job.user,
                    peer="127.0.0.1", route="/api/chat", model=lease.job.model,
                    backend=lease.backend.name, queueWait=lease.waited, firstByte=0.05,
                    duration=1.0, promptTokens=20, completionTokens=200, bytes=20_000,
                    status=200))
                reportTime += clock() - t0
            scheduler.enqueue(job(n)).addCallback(held.append)
            n += 1
        # Let the reactor turn: the store's results come back, its timer fires.
        await deferLater(reactor, 0, lambda: None)
    elapsed = clock() - start
    tail = clock() - (tailStart or start)
    t0 = clock()
    await requestLog.stopService()
    drain = clock() - t0
    t0 = clock()
    rows = await store.runInteraction(usageTotals, group="user")
    query = clock() - t0
    count = sum(r["requests"] for r in rows)
    store.close()
    size = os.path.getsize(os.path.join(directory, "state.db"))
    return {
        "logged": logged,
        "requests": requests,
        "cycles_per_second": round(requests / elapsed),
        "last_10k_cycles_per_second": round(min(TAIL, requests) / tail),
        "report_us_per_request": round(reportTime / requests * 1e6, 2) if logged else 0,
        # The dispatch itself (release + decision + lease callback), without reporting.
        "dispatch_us_first_10k": round(dispatchFirst / min(TAIL, requests) * 1e6, 2),
        "dispatch_us_last_10k": round(dispatchLast / min(TAIL, requests) * 1e6, 2),
        "rows": count,
        "drain_after_last_seconds": round(drain, 3),
        "usage_query_seconds": round(query, 3),
        "db_bytes": size,
        "dropped": requestLog.dropped,
    }


async def main(requests: int) -> None:
    """
    Both runs, the table, the JSON.
    """
    # The access line is formatted and written as twistd's text log would, to /dev/null.
    devnull = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(devnull)],
                                     redirectStandardIO=False)
    results = [await run(requests, False), await run(requests, True)]
    header = (f"{'run':<10} {'cycles/s':>9} {'last 10k/s':>11} {'dispatch us first/last 10k':>27} "
              f"{'report us':>10} "
              f"{'rows':>8} {'drain s':>8} {'query s':>8} {'db MiB':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{'logged' if r['logged'] else 'no log':<10} {r['cycles_per_second']:>9,} "
              f"{r['last_10k_cycles_per_second']:>11,} "
              f"{str(r['dispatch_us_first_10k']) + ' / ' + str(r['dispatch_us_last_10k']):>27} "
              f"{r['report_us_per_request']:>10} "
              f"{r['rows']:>8,} {r['drain_after_last_seconds']:>8} "
              f"{r['usage_query_seconds']:>8} {r['db_bytes'] / 2**20:>7.1f}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump({"benchmark": "request log vs dispatch", "python": sys.version.split()[0],
                   "implementation": platform.python_implementation(),
                   "machine": platform.machine(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "results": results}, f, indent=2)
        f.write("\n")
    print(f"\nwritten to {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    done: list[Any] = []

    def finished(result: Any) -> None:
        done.append(result)
        reactor.stop()

    reactor.callWhenRunning(
        lambda: ensureDeferred(main(args.requests)).addBoth(finished))
    reactor.run()
    if done and hasattr(done[0], "raiseException"):
        done[0].raiseException()
