"""
Memory under made-up user ids: one client sends N requests, each with an C{X-User-ID}
never seen before, through the proxy to a simulator answering at once; the proxy's
resident memory (C{VmRSS} from C{/proc/PID/status}) is sampled as the requests go.

Every such id becomes a user record in the scheduler; C{max_users} (default 10,000) caps
how many are tracked, the idle ones active least recently being forgotten first. Without
the cap (before it existed) each record lived for C{idle_forget} (an hour). The run
reports RSS after a warm-up, at every tenth of the run and at the end, plus the
scheduler's user count from C{/proxy/status}.

Real processes on 127.0.0.1 (system-chosen ports), driven by the raw-socket client of
C{bench/_procs.py} over C{--connections} persistent connections (all from one address).

Run: C{PYTHONPATH=. python bench/users.py [--n 100000] [--connections 8]
[--max-users 10000]}. Prints a table and writes C{bench/results/users.json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _procs import (  # noqa: E402
    Connection,
    Processes,
    buildRequest,
    getJSON,
    hostPort,
    readMany,
    writeResults,
)


def rssMiB(pid: int) -> float:
    """
    The resident set size of process C{pid}, in MiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def run(n: int, connections: int, maxUsers: int) -> dict[str, Any]:
    """
    Send C{n} requests with distinct user ids; sample the proxy's memory.
    """
    body = json.dumps({"model": "llama3.2", "prompt": "x", "stream": False}).encode()
    with Processes() as procs:
        sim = procs.sim("--models", "llama3.2", "--tps", "0", "--tokens", "1",
                        "--slots", str(connections))
        config = (f"[server]\nmax_users = {maxUsers}\n\n[[backends]]\nurl = \"{sim.url}\"\n"
                  f"slots = {connections}\n")
        proxy = procs.proxy(backends=1, config=config)
        host, port = hostPort(proxy.url)
        conns = [Connection(host, port) for _ in range(connections)]
        samples: list[dict[str, Any]] = []
        sent = 0
        started = time.perf_counter()
        step = max(1, n // 10)
        while sent < n:
            pairs = []
            for conn in conns:
                if sent >= n:
                    break
                request = buildRequest(host, port, "POST", "/api/generate", body,
                                       {"X-User-ID": f"made-up-{sent}"})
                pairs.append((conn, conn.send(request)))
                sent += 1
            readMany(pairs, timeout=60)
            for _, response in pairs:
                if response.status != 200:
                    raise RuntimeError(f"request failed: {response.status}")
            if sent % step < len(pairs) or sent >= n:
                users = len(getJSON(proxy.url, "/proxy/status")["users"])
                samples.append({"requests": sent, "rssMiB": round(rssMiB(proxy.pid), 1),
                                "users": users})
        elapsed = time.perf_counter() - started
        for conn in conns:
            conn.close()
    return {"n": n, "connections": connections, "maxUsers": maxUsers,
            "seconds": round(elapsed, 1), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--max-users", type=int, default=10_000)
    args = parser.parse_args()
    result = run(args.n, args.connections, args.max_users)
    print(f"{'requests':>10}  {'RSS MiB':>8}  {'users tracked':>13}")
    for sample in result["samples"]:
        print(f"{sample['requests']:>10,}  {sample['rssMiB']:>8}  {sample['users']:>13,}")
    print(f"{result['n']:,} requests in {result['seconds']} s")
    path = writeResults("users", result)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
