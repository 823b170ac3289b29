"""
End-to-end relay cost of the proxy: added latency and relayed streaming throughput.

Real processes on 127.0.0.1 (system-chosen ports): C{ollamamq-sim} backends and the proxy
(C{twistd -n ollamamq}), driven by the small raw-socket client in C{bench/_procs.py}.

Part 1, added latency. A simulator answering as fast as it can (C{--tps 0 --tokens 1}) and
a proxy in front of it. The same small request is sent N times (after a warm-up), strictly
one at a time over one persistent connection per target, alternating direct and proxied
requests (and which of the two goes first), so both see the same machine state:

  - C{POST /api/generate} with C{"stream": false}: time from writing the request to the last
    byte of the answer;
  - C{POST /api/chat} streaming NDJSON (20 tokens, C{options.num_predict}): time to the
    first body byte (the first token line), and to the end.

The added latency is the proxied percentile minus the direct one (and the median of the
per-pair differences). The proxy's CPU time per request comes from C{/proc/PID/stat}.

Part 2, relayed throughput. A simulator with C{--tps 0 --tokens 20000 --slots 4} streams
20,000 NDJSON lines (~1.9 MB) per request as fast as its reactor turns; the proxy has the
same backend with C{slots = 4} (TOML config, since C{--backend} gives one slot). One stream
and four concurrent streams, direct and through the proxy, each repeated; reported are
lines (= chunks, one per token) per second and body MB/s at the client, and the CPU used by
the simulator, the proxy and the client during the run (share of one core, from
C{/proc/PID/stat}), plus the proxy's CPU microseconds per relayed line.

The load generator must not be the bottleneck: the client is one Python thread reading all
streams through a C{selectors} loop with an incremental parser (no per-chunk C{readline});
in throughput runs it sleeps 2 ms between read rounds so each C{recv} returns many lines
(reading eagerly, once per token, costs more CPU and, on two cores, slows the sender). Its
own CPU share is printed next to the servers'; the direct runs show the simulator itself at
~100% of a core, i.e. the simulator, not the client, limits them.

Run: C{/tmp/venv/bin/python bench/relay.py [--n 1000] [--warmup 100] [--runs 5] [--quick]}.
Prints the tables and writes C{bench/results/relay.json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _procs import (  # noqa: E402
    Child,
    Connection,
    Processes,
    Response,
    buildRequest,
    cpuSeconds,
    hostPort,
    percentile,
    readMany,
    writeResults,
)

MODEL = "llama3"
TIME_CAP = 170.0  # seconds for the whole benchmark; runs left over are skipped
STREAM_TOKENS = 20_000
BATCH_DELAY = 0.002

GENERATE = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
CHAT_TOKENS = 20
CHAT = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "options": {"num_predict": CHAT_TOKENS},
    }
).encode()
STREAM = json.dumps({"model": MODEL, "prompt": "hi", "stream": True}).encode()


def vmHWM(pid: int) -> int | None:
    """
    Peak resident set size of a process in KiB (C{VmHWM} in C{/proc/PID/status}).
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def check(response: Response, what: str, lines: int | None = None) -> None:
    """
    Fail loudly on a wrong answer: a benchmark of errors measures nothing.
    """
    if response.status != 200:
        raise RuntimeError(f"{what}: HTTP {response.status}: {response.tail[-200:]!r}")
    if b'"error"' in response.tail:
        raise RuntimeError(f"{what}: error in the body: {response.tail[-200:]!r}")
    if lines is not None and response.lines != lines:
        raise RuntimeError(f"{what}: {response.lines} lines, expected {lines}")


def summary(seconds: list[float]) -> dict[str, float]:
    """
    Percentiles in milliseconds.
    """
    ms = [s * 1e3 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "over_5ms": sum(1 for v in ms if v > 5),
    }


# --- part 1: added latency ----------------------------------------------------------------


def latency(sim: Child, proxy: Child, n: int, warmup: int, deadline: float) -> dict[str, Any]:
    """
    N sequential requests of each kind, direct and proxied, interleaved.
    """
    targets = {}
    for label, child in (("direct", sim), ("proxy", proxy)):
        host, port = hostPort(child.url or "")
        targets[label] = (
            Connection(host, port),
            buildRequest(host, port, "POST", "/api/generate", GENERATE, {"X-User-ID": "bench"}),
            buildRequest(host, port, "POST", "/api/chat", CHAT, {"X-User-ID": "bench"}),
        )
    samples: dict[str, dict[str, list[float]]] = {
        key: {"direct": [], "proxy": []} for key in ("generate", "chat_ttfb", "chat_total")
    }
    proxyCPU = 0.0
    simCPU = 0.0
    done = 0
    for i in range(warmup + n):
        if time.monotonic() > deadline:
            print(f"  time cap reached after {done} measured iterations", file=sys.stderr)
            break
        order = ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct")
        for label in order:
            conn, generate, chat = targets[label]
            p0, s0 = cpuSeconds(proxy.pid), cpuSeconds(sim.pid)
            r1 = conn.exchange(generate)
            check(r1, f"{label} generate", lines=None)
            r2 = conn.exchange(chat)
            check(r2, f"{label} chat", lines=CHAT_TOKENS + 1)
            if i < warmup:
                continue
            if label == "proxy":
                proxyCPU += cpuSeconds(proxy.pid) - p0
            simCPU += cpuSeconds(sim.pid) - s0
            assert r1.doneAt is not None and r2.firstByteAt is not None and r2.doneAt is not None
            samples["generate"][label].append(r1.doneAt - r1.sentAt)
            samples["chat_ttfb"][label].append(r2.firstByteAt - r2.sentAt)
            samples["chat_total"][label].append(r2.doneAt - r2.sentAt)
        if i >= warmup:
            done += 1
    connects = {label: t[0].connects for label, t in targets.items()}
    for conn, _, _ in targets.values():
        conn.close()
    result: dict[str, Any] = {"iterations": done, "connections_opened": connects, "kinds": {}}
    for key, byTarget in samples.items():
        direct, proxied = byTarget["direct"], byTarget["proxy"]
        d, p = summary(direct), summary(proxied)
        added = {k: p[k] - d[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}
        pairs = [(b - a) * 1e3 for a, b in zip(direct, proxied)]
        added["paired_median_ms"] = statistics.median(pairs)
        result["kinds"][key] = {"direct": d, "proxy": p, "added": added}
    # Two proxied requests per iteration (generate + chat).
    result["proxy_cpu_ms_per_request"] = proxyCPU / max(1, 2 * done) * 1e3
    result["sim_cpu_ms_per_request"] = simCPU / max(1, 4 * done) * 1e3
    return result


def printLatency(result: dict[str, Any]) -> None:
    names = {
        "generate": "/api/generate stream=false, total",
        "chat_ttfb": "/api/chat stream, first body byte",
        "chat_total": f"/api/chat stream, {CHAT_TOKENS} lines, total",
    }
    print(f"\nAdded latency: {result['iterations']} sequential requests per kind and target "
          "(after warm-up), direct and proxied interleaved; milliseconds")
    header = f"{'request':<36} {'target':<8} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>7}"
    print(header)
    print("-" * len(header))
    for key, row in result["kinds"].items():
        for target in ("direct", "proxy"):
            s = row[target]
            print(f"{names[key] if target == 'direct' else '':<36} {target:<8} {s['p50_ms']:>7.3f} "
                  f"{s['p90_ms']:>7.3f} {s['p99_ms']:>7.3f} {s['max_ms']:>7.2f} {s['mean_ms']:>7.3f}")
        a = row["added"]
        print(f"{'':<36} {'added':<8} {a['p50_ms']:>7.3f} {a['p90_ms']:>7.3f} {a['p99_ms']:>7.3f} "
              f"{'':>7} {a['mean_ms']:>7.3f}   (paired median {a['paired_median_ms']:.3f})")
    over = {t: sum(row[t]["over_5ms"] for row in result["kinds"].values()) for t in ("direct", "proxy")}
    print(f"samples over 5 ms (all three rows): direct {over['direct']}, proxy {over['proxy']} "
          f"of {3 * result['iterations']} each")
    print(f"proxy CPU per proxied request: {result['proxy_cpu_ms_per_request']:.3f} ms; "
          f"simulator CPU per request: {result['sim_cpu_ms_per_request']:.3f} ms; "
          f"connections opened: {result['connections_opened']}")


# --- part 2: relayed throughput -----------------------------------------------------------


def streamRun(target: Child, sim: Child, proxy: Child, streams: int) -> dict[str, Any]:
    """
    C{streams} concurrent 20,000-token NDJSON streams from C{target}; one measurement.
    """
    host, port = hostPort(target.url or "")
    request = buildRequest(host, port, "POST", "/api/generate", STREAM, {"X-User-ID": "bench"})
    conns = [Connection(host, port, timeout=60) for _ in range(streams)]
    try:
        for conn in conns:
            conn.connect()
        cpu0 = {"sim": cpuSeconds(sim.pid), "proxy": cpuSeconds(proxy.pid)}
        client0 = time.process_time()
        start = time.perf_counter()
        pairs = [(conn, conn.send(request)) for conn in conns]
        readMany(pairs, timeout=90, batchDelay=BATCH_DELAY)
        wall = time.perf_counter() - start
        client = time.process_time() - client0
        cpu = {k: cpuSeconds(c.pid) - cpu0[k] for k, c in (("sim", sim), ("proxy", proxy))}
    finally:
        for conn in conns:
            conn.close()
    for _, response in pairs:
        check(response, f"stream from {target.name}", lines=STREAM_TOKENS + 1)
        if b'"done":true' not in response.tail:
            raise RuntimeError(f"stream from {target.name} did not end with done: {response.tail!r}")
    lines = sum(r.lines for _, r in pairs)
    body = sum(r.bodyBytes for _, r in pairs)
    return {
        "wall_s": wall,
        "lines": lines,
        "chunks": sum(r.chunks for _, r in pairs),
        "body_bytes": body,
        "lines_per_s": lines / wall,
        "mb_per_s": body / wall / 1e6,
        "sim_cpu_pct": cpu["sim"] / wall * 100,
        "proxy_cpu_pct": cpu["proxy"] / wall * 100,
        "client_cpu_pct": client / wall * 100,
        "proxy_cpu_us_per_line": cpu["proxy"] / lines * 1e6,
        "per_stream_lines_per_s": [r.lines / ((r.doneAt or 0) - r.sentAt) for _, r in pairs],
    }


def throughput(sim: Child, proxy: Child, runs: int, deadline: float) -> list[dict[str, Any]]:
    """
    Direct and proxied, 1 and 4 streams, C{runs} times each (interleaved); the median run.
    """
    raw: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for streams in (1, 4):
        for run in range(runs):
            order = ("direct", "proxy") if run % 2 == 0 else ("proxy", "direct")
            for label in order:
                if time.monotonic() > deadline:
                    print("  time cap reached; skipping remaining throughput runs", file=sys.stderr)
                    break
                target = sim if label == "direct" else proxy
                raw.setdefault((streams, label), []).append(streamRun(target, sim, proxy, streams))
    rows = []
    for (streams, label), results in sorted(raw.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ordered = sorted(results, key=lambda r: r["lines_per_s"])
        median = ordered[len(ordered) // 2]
        rows.append(
            {
                "target": label,
                "streams": streams,
                "runs": len(results),
                "median_run": median,
                "lines_per_s_all_runs": [r["lines_per_s"] for r in results],
            }
        )
    return rows


def printThroughput(rows: list[dict[str, Any]], proxyPeakKiB: int | None) -> None:
    print(f"\nRelayed throughput: {STREAM_TOKENS:,}-line NDJSON streams (/api/generate, sim --tps 0), "
          "median of the runs; CPU as % of one core during the run")
    header = (f"{'target':<8} {'streams':>7} {'lines/s':>9} {'MB/s':>6} {'wall s':>7} "
              f"{'sim CPU':>8} {'proxy CPU':>9} {'client CPU':>10} {'proxy us/line':>13}  lines/s of every run")
    print(header)
    print("-" * len(header))
    for row in rows:
        m = row["median_run"]
        proxied = row["target"] == "proxy"
        proxyCPU = f"{m['proxy_cpu_pct']:.0f}%" if proxied else "-"
        perLine = f"{m['proxy_cpu_us_per_line']:.1f}" if proxied else "-"
        print(f"{row['target']:<8} {row['streams']:>7} {m['lines_per_s']:>9,.0f} {m['mb_per_s']:>6.2f} "
              f"{m['wall_s']:>7.2f} {m['sim_cpu_pct']:>7.0f}% {proxyCPU:>9} "
              f"{m['client_cpu_pct']:>9.0f}% {perLine:>13}  "
              + ", ".join(f"{v:,.0f}" for v in row["lines_per_s_all_runs"]))
    byKey = {(r["target"], r["streams"]): r["median_run"]["lines_per_s"] for r in rows}
    for streams in (1, 4):
        if ("direct", streams) in byKey and ("proxy", streams) in byKey:
            ratio = byKey[("proxy", streams)] / byKey[("direct", streams)]
            print(f"proxied / direct, {streams} stream(s): {ratio:.0%}")
    if proxyPeakKiB is not None:
        print(f"proxy peak RSS (VmHWM) after all runs: {proxyPeakKiB / 1024:.1f} MiB")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="measured requests per kind and target")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5, help="throughput repetitions")
    parser.add_argument("--quick", action="store_true", help="--n 200 --warmup 20 --runs 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.warmup, args.runs = 200, 20, 1
    deadline = time.monotonic() + TIME_CAP
    print(f"ollamamq relay benchmark: {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    print(f"client: one thread, raw sockets, incremental parser; throughput reads sleep "
          f"{BATCH_DELAY * 1e3:g} ms between rounds (client CPU is shown to prove it is not "
          "the limit)")
    with Processes() as procs:
        sim1 = procs.sim("--tps", "0", "--tokens", "1", name="lat")
        proxy1 = procs.proxy("--backend", sim1.url or "", backends=1)
        lat = latency(sim1, proxy1, args.n, args.warmup, deadline)
        printLatency(lat)
        errorsLogged = proxy1.grep(r"warn|Traceback|Unhandled|error")
        procs.stop(proxy1)
        procs.stop(sim1)

        sim4 = procs.sim("--tps", "0", "--tokens", str(STREAM_TOKENS), "--slots", "4", name="fast")
        config = f'[[backends]]\nurl = "{sim4.url}"\nname = "fast"\nslots = 4\n'
        proxy4 = procs.proxy(config=config, backends=1)
        rows = throughput(sim4, proxy4, args.runs, deadline)
        peak = vmHWM(proxy4.pid)
        printThroughput(rows, peak)
        errorsLogged += proxy4.grep(r"warn|Traceback|Unhandled|error")
    if errorsLogged:
        print(f"\nproxy logged {len(errorsLogged)} warning/error lines, e.g.:")
        for line in errorsLogged[:5]:
            print("  " + line[:200])
    else:
        print("\nproxy logged no warnings or errors")
    path = writeResults(
        "relay",
        {
            "parameters": {
                "n": args.n,
                "warmup": args.warmup,
                "runs": args.runs,
                "stream_tokens": STREAM_TOKENS,
                "client_batch_delay_s": BATCH_DELAY,
            },
            "latency": lat,
            "throughput": rows,
            "proxy_peak_rss_kib": peak,
            "proxy_warnings": errorsLogged[:50],
        },
    )
    print(f"written to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
