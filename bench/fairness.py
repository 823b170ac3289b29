"""
End-to-end fairness of the proxy: who gets the backend when users compete for it.

Each scenario starts a fresh C{ollamamq-sim} (C{--tps 200 --tokens 20}: a request takes
0.10 s of "GPU" time; 0.30 s with C{num_predict} 60) with one or two slots and a fresh
proxy whose TOML config gives the backend the same number of slots and sets the users'
C{weight} / C{priority}. Client threads (one per outstanding request, blocking sockets,
streaming C{POST /api/generate}, user in C{X-User-ID}, a sequence number in
C{X-Bench-Seq}) generate the load:

  - "flood N": N requests sent at once (a backlog that drains);
  - "loop K": a closed loop keeping K requests in flight (a new one as soon as one ends).

A: four equal users, one slot: a heavy user floods 40, three light users loop 1 each.
B: weights 1:2:3, all backlogged (loop 6 each), two slots, 10 s.
C: a VIP light user and a normal light user (loop 1 each) against a 30-request flood.
D: C{priority = "boost"} vs normal, equal weights, both backlogged, one slot, 8 s.
E: equal weights, both backlogged, one user asking for answers 3x as long (C{num_predict}
   60 vs 20): the scheduler charges one unit per request, so GPU time splits 3:1.
E2: scenario E with C{fair_share = "time"} in the proxy's config: the scheduler charges
   lease seconds, so GPU time should split 1:1 (and requests 1:3).

Measurements come from the simulator's own request log (C{GET /sim/stats}: per request
C{user}, C{receivedAt}, C{startedAt}, C{finishedAt}, headers), matched to the client's
records by C{X-Bench-Seq}; simulator and client read the same wall clock (one host).

  - Contention window: from the moment every user of the scenario has sent its first
    request to the first moment one stops competing (a flooding user's last request is
    dispatched, or the loops are told to stop).
  - Share by requests: requests the backend started within the window. Share by
    GPU-seconds: the part of each request's [startedAt, finishedAt] inside the window.
  - Expected share: weight (doubled for C{boost}) over the sum of the competing users'
    weights; VIP users are a tier above and are left out of it (and of Jain's index).
  - Jain's index over the weight-normalised shares (share / expected share):
    C{(sum x)^2 / (n sum x^2)}; 1.0 is exactly weighted-fair, 1/n is one user taking all.
  - Queue wait of a request sent before the window closed (a flood sent at the start
    included): C{startedAt} at the backend minus the client's send time:
    the time spent queued in the proxy plus its relay overhead (~1 ms, see
    C{bench/relay.py}). Also shown: client time-to-first-byte minus the uncontended one
    (median of 5 requests sent alone before the scenario).
  - Backend busy: GPU-seconds in the window / (window x slots); the idle remainder is the
    dispatch gap between one request ending and the next starting.

The client is not the bottleneck: at most ~45 threads, nearly all blocked in C{recv}
while their requests queue, and the load is at most ~20 requests/s; its CPU time is
printed. Sanity checks printed per scenario: HTTP errors, the backend's peak concurrency
(must not exceed its slots) and how many requests reached the simulator while all its slots
were running (must be 0: the proxy never hands a backend more than its slots).

Run: C{/tmp/venv/bin/python bench/fairness.py [--only A,C]}. Prints a table per scenario
and writes C{bench/results/fairness.json}. About 1.5 minutes on two cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _procs import (  # noqa: E402
    Connection,
    Processes,
    buildRequest,
    getJSON,
    hostPort,
    percentile,
    writeResults,
)

MODEL = "llama3"
TPS = 200
TOKENS = 20
SCENARIO_CAP = 45.0  # seconds of load per scenario at most
TOTAL_CAP = 175.0  # seconds for the whole benchmark; later scenarios are skipped
REQUEST_TIMEOUT = 60.0


@dataclass
class UserLoad:
    """
    One user's policy and load.

    @ivar mode: C{"flood"} (C{count} requests at once) or C{"loop"} (C{count} in flight).
    @ivar tokens: answer length asked for (C{options.num_predict}).
    @ivar delay: seconds after the scenario starts before this user begins.
    """

    name: str
    mode: str
    count: int
    weight: float = 1.0
    priority: str = "normal"
    tokens: int = TOKENS
    delay: float = 0.0

    @property
    def effectiveWeight(self) -> float:
        return self.weight * 2 if self.priority == "boost" else self.weight

    def describe(self) -> str:
        return f"{self.mode} {self.count}" + (f", {self.tokens} tok" if self.tokens != TOKENS else "")


@dataclass
class Scenario:
    key: str
    title: str
    slots: int
    users: list[UserLoad]
    duration: float | None = None  # for loop-only scenarios
    fairShare: str = "requests"  # [server] fair_share of the proxy


SCENARIOS = [
    Scenario(
        "A",
        "4 equal users, 1 slot: heavy floods 40, three light users loop 1 in flight",
        1,
        [
            UserLoad("heavy", "flood", 40),
            UserLoad("light1", "loop", 1, delay=0.3),
            UserLoad("light2", "loop", 1, delay=0.3),
            UserLoad("light3", "loop", 1, delay=0.3),
        ],
    ),
    Scenario(
        "B",
        "weights 1:2:3, all backlogged (loop 6 each), 2 slots",
        2,
        [
            UserLoad("w1", "loop", 6, weight=1),
            UserLoad("w2", "loop", 6, weight=2),
            UserLoad("w3", "loop", 6, weight=3),
        ],
        duration=10.0,
    ),
    Scenario(
        "C",
        "VIP light user vs heavy flood (and a normal light user), 1 slot",
        1,
        [
            UserLoad("heavy", "flood", 30),
            UserLoad("vip", "loop", 1, priority="vip", delay=0.3),
            UserLoad("light", "loop", 1, delay=0.3),
        ],
    ),
    Scenario(
        "D",
        "boost vs normal (both weight 1, backlogged: loop 4 each), 1 slot",
        1,
        [
            UserLoad("boosted", "loop", 4, priority="boost"),
            UserLoad("normal", "loop", 4),
        ],
        duration=8.0,
    ),
    Scenario(
        "E",
        "equal weights, backlogged (loop 4), one user's answers 3x longer, 1 slot",
        1,
        [
            UserLoad("long", "loop", 4, tokens=3 * TOKENS),
            UserLoad("short", "loop", 4),
        ],
        duration=9.0,
    ),
    Scenario(
        "E2",
        'scenario E with fair_share = "time" (the unit of service is lease seconds)',
        1,
        [
            UserLoad("long", "loop", 4, tokens=3 * TOKENS),
            UserLoad("short", "loop", 4),
        ],
        duration=9.0,
        fairShare="time",
    ),
]


@dataclass
class Sent:
    """
    The client's record of one request.
    """

    user: str
    seq: int
    sentWall: float
    status: int = 0
    ttfb: float | None = None
    total: float | None = None
    error: str | None = None


@dataclass
class Run:
    """
    Shared state of one scenario's client threads.
    """

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: list[Sent] = field(default_factory=list)
    seq: itertools.count = field(default_factory=lambda: itertools.count(1))
    deadline: float = 0.0

    def one(self, conn: Connection, user: UserLoad) -> Sent:
        """
        Send one streaming generate request for C{user} and read it to the end.
        """
        host, port = conn.host, conn.port
        with self.lock:
            seq = next(self.seq)
        body = json.dumps(
            {"model": MODEL, "prompt": "hi", "stream": True, "options": {"num_predict": user.tokens}}
        ).encode()
        request = buildRequest(host, port, "POST", "/api/generate", body,
                               {"X-User-ID": user.name, "X-Bench-Seq": str(seq)})
        record = Sent(user.name, seq, time.time())
        try:
            response = conn.exchange(request)
            record.status = response.status
            if response.firstByteAt is not None:
                record.ttfb = response.firstByteAt - response.sentAt
            record.total = (response.doneAt or response.sentAt) - response.sentAt
            if response.status != 200 or b'"error"' in response.tail:
                record.error = response.tail[-200:].decode("utf-8", "replace")
        except Exception as e:  # recorded, reported; the run goes on
            record.error = f"{type(e).__name__}: {e}"
            conn.close()
        with self.lock:
            self.sent.append(record)
        return record

    def worker(self, user: UserLoad, requests: int) -> None:
        """
        Send up to C{requests} requests one after another until told to stop.
        """
        host, port = hostPort(self.url)
        conn = Connection(host, port, timeout=REQUEST_TIMEOUT)
        try:
            for _ in range(requests):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                self.one(conn, user)
        finally:
            conn.close()


def proxyConfig(simURL: str, scenario: Scenario) -> str:
    lines = ["[server]", f'fair_share = "{scenario.fairShare}"', ""]
    lines += ["[[backends]]", f'url = "{simURL}"', 'name = "sim"', f"slots = {scenario.slots}", ""]
    for user in scenario.users:
        lines += [f"[users.{user.name}]", f"weight = {user.weight}",
                  f'priority = "{user.priority}"', ""]
    return "\n".join(lines)


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def jain(values: list[float]) -> float:
    if not values or not any(values):
        return float("nan")
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def runScenario(procs: Processes, scenario: Scenario) -> dict[str, Any]:
    """
    Start the processes, run the load, collect and analyse the logs.
    """
    sim = procs.sim("--tps", str(TPS), "--tokens", str(TOKENS), "--slots", str(scenario.slots),
                    "--models", MODEL, name=f"sim{scenario.key}")
    proxy = procs.proxy(config=proxyConfig(sim.url or "", scenario), backends=1)
    try:
        return measure(sim.url or "", proxy.url or "", proxy, scenario)
    finally:
        procs.stop(proxy)
        procs.stop(sim)


def measure(simURL: str, proxyURL: str, proxy: Any, scenario: Scenario) -> dict[str, Any]:
    # Uncontended baseline: 5 requests alone (after one to load the model).
    base = Run(proxyURL, deadline=time.monotonic() + 30)
    host, port = hostPort(proxyURL)
    conn = Connection(host, port, timeout=REQUEST_TIMEOUT)
    probe = UserLoad("probe", "loop", 1)
    baseline = [base.one(conn, probe) for _ in range(6)][1:]
    conn.close()
    if any(b.error for b in baseline):
        raise RuntimeError(f"baseline requests failed: {[b.error for b in baseline]}")
    baseTTFB = statistics.median(b.ttfb or 0.0 for b in baseline)
    ignored = {b.seq for b in base.sent}

    run = Run(proxyURL, seq=base.seq, deadline=time.monotonic() + SCENARIO_CAP)
    cpu0 = time.process_time()
    threads: list[tuple[UserLoad, threading.Thread]] = []
    start = time.time()

    def launch(user: UserLoad) -> None:
        if user.delay:
            time.sleep(user.delay)
        for i in range(user.count):
            requests = 1 if user.mode == "flood" else 10_000
            t = threading.Thread(target=run.worker, args=(user, requests), daemon=True,
                                 name=f"{user.name}-{i}")
            t.start()
            threads.append((user, t))

    launchers = [threading.Thread(target=launch, args=(u,), daemon=True) for u in scenario.users]
    for t in launchers:
        t.start()
    for t in launchers:
        t.join()
    floods = [t for u, t in threads if u.mode == "flood"]
    if floods:
        for t in floods:
            t.join(max(0.0, run.deadline - time.monotonic()))
    else:
        time.sleep(min(scenario.duration or 0.0, SCENARIO_CAP))
    stopAt = time.time()
    run.stop.set()
    for _, t in threads:
        t.join(max(1.0, run.deadline + REQUEST_TIMEOUT - time.monotonic()))
    stuck = sum(t.is_alive() for _, t in threads)
    clientCPU = time.process_time() - cpu0
    elapsed = time.time() - start

    stats = getJSON(simURL, "/sim/stats")
    status = getJSON(proxyURL, "/proxy/status")
    return analyse(scenario, run, stats, status, ignored, baseTTFB, start, stopAt,
                   elapsed, clientCPU, stuck, proxy)


def analyse(scenario: Scenario, run: Run, stats: dict, status: dict, ignored: set[int],
            baseTTFB: float, start: float, stopAt: float, elapsed: float, clientCPU: float,
            stuck: int, proxy: Any) -> dict[str, Any]:
    bySeq = {}
    for entry in stats["log"]:
        seq = entry.get("headers", {}).get("x-bench-seq")
        if seq is not None and int(seq) not in ignored:
            bySeq[int(seq)] = entry
    records = [s for s in run.sent if s.seq not in ignored]
    names = [u.name for u in scenario.users]
    # When did each user begin competing, and when did one stop?
    firstSent = {n: min((s.sentWall for s in records if s.user == n), default=stopAt) for n in names}
    windowStart = max(firstSent.values())
    windowEnd = stopAt
    for user in scenario.users:
        if user.mode == "flood":
            starts = [bySeq[s.seq]["startedAt"] for s in records
                      if s.user == user.name and s.seq in bySeq and bySeq[s.seq]["startedAt"]]
            if starts:
                windowEnd = min(windowEnd, max(starts))
    window = max(1e-9, windowEnd - windowStart)

    perUser: dict[str, dict[str, Any]] = {}
    competing = [u for u in scenario.users if u.priority != "vip"]
    weightSum = sum(u.effectiveWeight for u in competing)
    for user in scenario.users:
        mine = [s for s in records if s.user == user.name]
        entries = [bySeq[s.seq] for s in mine if s.seq in bySeq]
        inWindow = [e for e in entries if e["startedAt"] and windowStart <= e["startedAt"] < windowEnd]
        gpu = sum(overlap(e["startedAt"], e["finishedAt"], windowStart, windowEnd)
                  for e in entries if e["startedAt"] and e["finishedAt"])
        # Requests sent while the users competed (a flood sent before the window opened
        # included: its wait is the time its backlog took to drain).
        waits = [bySeq[s.seq]["startedAt"] - s.sentWall for s in mine
                 if s.seq in bySeq and bySeq[s.seq]["startedAt"] and s.sentWall < windowEnd]
        excess = [s.ttfb - baseTTFB for s in mine if s.ttfb is not None and s.sentWall < windowEnd]
        perUser[user.name] = {
            "priority": user.priority,
            "weight": user.weight,
            "effective_weight": user.effectiveWeight,
            "load": user.describe(),
            "sent": len(mine),
            "errors": sum(1 for s in mine if s.error),
            "error_examples": [s.error for s in mine if s.error][:3],
            "started_in_window": len(inWindow),
            "gpu_seconds_in_window": gpu,
            "expected_share": (user.effectiveWeight / weightSum) if user.priority != "vip" else None,
            "wait_p50_ms": percentile(waits, 50) * 1e3 if waits else None,
            "wait_p99_ms": percentile(waits, 99) * 1e3 if waits else None,
            "wait_max_ms": max(waits) * 1e3 if waits else None,
            "wait_samples": len(waits),
            "ttfb_excess_p50_ms": percentile(excess, 50) * 1e3 if excess else None,
            "ttfb_excess_p99_ms": percentile(excess, 99) * 1e3 if excess else None,
            "proxy_served": next((u["served"] for u in status["users"] if u["id"] == user.name), None),
        }
    totalReqs = sum(p["started_in_window"] for p in perUser.values()) or 1
    totalGPU = sum(p["gpu_seconds_in_window"] for p in perUser.values()) or 1e-9
    compReqs = sum(perUser[u.name]["started_in_window"] for u in competing) or 1
    compGPU = sum(perUser[u.name]["gpu_seconds_in_window"] for u in competing) or 1e-9
    for name, p in perUser.items():
        p["share_requests"] = p["started_in_window"] / totalReqs
        p["share_gpu"] = p["gpu_seconds_in_window"] / totalGPU
        if p["expected_share"] is not None:
            p["normalised_requests"] = p["started_in_window"] / compReqs / p["expected_share"]
            p["normalised_gpu"] = p["gpu_seconds_in_window"] / compGPU / p["expected_share"]
    # Backend-side sanity: how long requests waited inside the simulator, peak concurrency.
    ours = [bySeq[s.seq] for s in records if s.seq in bySeq]
    simWaits = [e["startedAt"] - e["receivedAt"] for e in ours if e["startedAt"]]
    # A request that reached the simulator while all its slots were running something
    # means the proxy handed the backend more than its slots.
    timed = [e for e in stats["log"] if e["startedAt"] and e["finishedAt"]]
    oversubscribed = sum(
        1 for e in ours
        if sum(1 for x in timed if x is not e and x["startedAt"] <= e["receivedAt"] < x["finishedAt"])
        >= scenario.slots
    )
    gaps: list[float] = []
    if scenario.slots == 1:
        ordered = sorted((e for e in ours if e["startedAt"] and e["finishedAt"]),
                         key=lambda e: e["startedAt"])
        gaps = [b["startedAt"] - a["finishedAt"] for a, b in zip(ordered, ordered[1:])
                if windowStart <= b["startedAt"] < windowEnd]
    proxyWarnings = proxy.grep(r"\bwarn|Traceback|Unhandled|rror")
    return {
        "scenario": scenario.key,
        "title": scenario.title,
        "slots": scenario.slots,
        "window_s": window,
        "window_start_after_s": windowStart - start,
        "elapsed_s": elapsed,
        "backend_busy": totalGPU / (window * scenario.slots),
        "dispatch_gap_ms_p50": percentile(gaps, 50) * 1e3 if gaps else None,
        "dispatch_gap_ms_p99": percentile(gaps, 99) * 1e3 if gaps else None,
        "jain_requests": jain([perUser[u.name]["normalised_requests"] for u in competing]),
        "jain_gpu": jain([perUser[u.name]["normalised_gpu"] for u in competing]),
        "uncontended_ttfb_ms": baseTTFB * 1e3,
        "sim_max_concurrent": stats["maxConcurrent"],
        "sim_internal_wait_max_ms": max(simWaits) * 1e3 if simWaits else None,
        "sim_arrivals_with_all_slots_busy": oversubscribed,
        "sim_log_matched": len(ours),
        "client_records": len(records),
        "client_cpu_s": clientCPU,
        "client_threads_stuck": stuck,
        "proxy_warnings": proxyWarnings[:20],
        "users": perUser,
    }


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def printScenario(r: dict[str, Any]) -> None:
    print(f"\nScenario {r['scenario']}: {r['title']}")
    gap = (f", dispatch gap p50/p99 {fmt(r['dispatch_gap_ms_p50'], '.1f')}/"
           f"{fmt(r['dispatch_gap_ms_p99'], '.1f')} ms" if r["dispatch_gap_ms_p50"] is not None else "")
    print(f"contention window {r['window_s']:.2f} s (from +{r['window_start_after_s']:.2f} s), "
          f"backend busy {r['backend_busy']:.1%}{gap}; uncontended TTFB "
          f"{r['uncontended_ttfb_ms']:.1f} ms")
    header = (f"{'user':<8} {'prio':<6} {'w':>3} {'load':<13} {'reqs':>4} {'share':>6} "
              f"{'GPU-s':>6} {'share':>6} {'expect':>6} {'norm':>5}  {'wait p50':>8} {'p99':>6} {'max':>6} "
              f"{'TTFB+ p50':>9} {'p99':>6} {'err':>3}")
    print(header)
    print("-" * len(header))
    for name, u in r["users"].items():
        expected = "tier" if u["expected_share"] is None else f"{u['expected_share']:.1%}"
        norm = "-" if u["expected_share"] is None else f"{u['normalised_requests']:.2f}"
        print(f"{name:<8} {u['priority']:<6} {u['weight']:>3g} {u['load']:<13} "
              f"{u['started_in_window']:>4} {u['share_requests']:>6.1%} "
              f"{u['gpu_seconds_in_window']:>6.2f} {u['share_gpu']:>6.1%} {expected:>6} {norm:>5}  "
              f"{fmt(u['wait_p50_ms']):>8} {fmt(u['wait_p99_ms']):>6} {fmt(u['wait_max_ms']):>6} "
              f"{fmt(u['ttfb_excess_p50_ms']):>9} {fmt(u['ttfb_excess_p99_ms']):>6} {u['errors']:>3}")
    if any(u["expected_share"] is None for u in r["users"].values()):
        print("(expect = share of the non-VIP service; VIP requests go first whenever queued)")
    print(f"Jain (weight-normalised, non-VIP users): by requests {r['jain_requests']:.4f}, "
          f"by GPU-seconds {r['jain_gpu']:.4f}")
    served = ", ".join(f"{n}={u['proxy_served']}" for n, u in r["users"].items())
    print(f"checks: sim peak concurrency {r['sim_max_concurrent']} (slots {r['slots']}), requests "
          f"reaching the sim with all slots busy {r['sim_arrivals_with_all_slots_busy']}, "
          f"{r['sim_log_matched']}/"
          f"{r['client_records']} requests matched in sim log, proxy served: {served}, client CPU "
          f"{r['client_cpu_s']:.2f} s in {r['elapsed_s']:.1f} s, stuck threads "
          f"{r['client_threads_stuck']}, proxy warnings {len(r['proxy_warnings'])}")
    for line in r["proxy_warnings"][:3]:
        print("  proxy: " + line[:200])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated scenario letters")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.key in args.only.upper().split(",")]
    deadline = time.monotonic() + TOTAL_CAP
    print(f"ollamamq fairness benchmark: sim --tps {TPS} --tokens {TOKENS} "
          f"({TOKENS / TPS:.2f} s per request), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    print("reqs/GPU-s: started / busy within the contention window; norm = (share among non-VIP "
          "users) / expected, 1.00 = weighted-fair")
    print("wait = backend startedAt - client send time (proxy queueing + ~1 ms relay); "
          "TTFB+ = client TTFB - uncontended TTFB; both over requests sent before the window closed, ms")
    results = []
    with Processes() as procs:
        for scenario in chosen:
            if time.monotonic() > deadline:
                print(f"\ntime cap reached; scenario {scenario.key} skipped")
                continue
            result = runScenario(procs, scenario)
            printScenario(result)
            results.append(result)
    path = writeResults(
        "fairness",
        {
            "parameters": {"tps": TPS, "tokens": TOKENS, "model": MODEL},
            "scenarios": results,
        },
    )
    print(f"\nwritten to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
