"""
Console cost: what one pushed event and one redraw cost the console, by number of users.

The daemon's side of a console is fixed by design: it sends each event once, and the
console asks for the users and queue listings at most every REFRESH_INTERVAL however many
events arrive. This measures the console's own side: L{ConsoleController.eventReceived}
per event (state patch, strip, scheduling) and one redraw (view rebuilt from the mirrored
state, then rendered at 100x30), for 10 to 2,000 users with up to 200 queued requests.
It also times the two reads a console makes as the daemon serves them (the queue's first
page; Snapshot and every ListUsers page) over an in-memory AMP connection to the real control
responders and scheduler, with the same numbers of users each queueing one request:
both ends run in this process, so it is an upper bound of the daemon's share. Prints a
table and writes C{bench/results/console.json}.

Run: C{PYTHONPATH=. python bench/console.py [--quick]}
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from urwid.canvas import CanvasCache

from ollamamq.console.app import DRAW_INTERVAL, REFRESH_INTERVAL, RESYNC_INTERVAL, ConsoleController
from ollamamq.console.widgets import ConsoleView

USERS = [10, 100, 1000, 2000]


class _NeverEndpoint:
    """
    An endpoint whose connection attempt never finishes: the controller is measured alone.
    """

    def connect(self, factory: object) -> Deferred:
        """
        Connect C{factory}'s protocol to a new daemon end, or fail.
        """
        return Deferred()


def controllerWith(users: int) -> tuple[ConsoleController, ConsoleView, Clock]:
    """
    A controller whose mirrored state has C{users} users, 4 backends and a full queue page.
    """
    clock = Clock()
    view = ConsoleView(lambda action: None, utf8=True, clock=clock.seconds)
    controller = ConsoleController(view, _NeverEndpoint(), clock, "bench.sock")
    controller.state.update(
        backends=[{"name": f"gpu{i}", "url": f"http://gpu{i}:11434", "state": "online",
                   "online": True, "kind": "ollama", "slots": 2, "active": 1,
                   "draining": False, "models": ["llama3:latest"], "loaded": ["llama3:latest"]}
                  for i in range(4)],
        users=[{"id": f"user{i:05d}", "priority": "normal", "weight": 1.0, "blocked": False,
                "queued": 1, "active": 0, "served": i, "runtime": []} for i in range(users)],
        queue=[{"id": f"r{i}", "position": i + 1, "user": f"user{i % users:05d}",
                "model": "llama3", "waited": float(i), "peer": "10.0.0.1"}
               for i in range(min(200, users))],
        queued=users, active=4,
    )
    return controller, view, clock


def refreshRounds(users: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """
    The two reads a console makes of the real control server with C{users} queued
    users: the queue's first page (at most every REFRESH_INTERVAL under events) and the
    resynchronisation (Snapshot and every ListUsers page, every RESYNC_INTERVAL).
    """
    from twisted.internet.defer import ensureDeferred
    from twisted.protocols import amp
    from twisted.test.iosim import connectedServerAndClient

    from ollamamq.console.app import MAX_QUEUE, MAX_USERS, _pages
    from ollamamq.control import amp as commands
    from ollamamq.control.server import ControlFactory
    from tests.controlfixture import ControlFixture

    fixture = ControlFixture(maxQueuedTotal=users + 10)
    for i in range(users):
        fixture.enqueue(f"user{i:05d}", requestId=f"r{i}", peer="10.0.0.1")
    factory = ControlFactory(fixture.actions, fixture.hub)
    client, server, pump = connectedServerAndClient(lambda: factory.buildProtocol(None), amp.AMP)

    async def queue() -> None:
        await _pages(client, commands.ListQueue, "requests", MAX_QUEUE)

    async def resync() -> None:
        await client.callRemote(commands.Snapshot)
        await _pages(client, commands.ListUsers, "users", MAX_USERS)

    def run(fetch: Callable[[], Any]) -> Callable[[], None]:
        def once() -> None:
            d = ensureDeferred(fetch())
            pump.flush()
            assert d.called, "the read did not finish"
        return once

    return run(queue), run(resync)


def timeit(call: Callable[[], object], budget: float) -> float:
    """
    Seconds per call, over at least C{budget} seconds of calls.
    """
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            return elapsed / calls


def main(argv: list[str]) -> int:
    """
    Run the scenarios, print the table, write the JSON.
    """
    budget = 0.2 if "--quick" in argv else 1.0
    results = []
    for users in USERS:
        controller, view, clock = controllerWith(users)
        finished = json.dumps({"id": "r1", "user": "user00001", "model": "llama3",
                               "backend": "gpu1", "duration": 1.0})
        policy = json.dumps({"user": {"id": f"user{users - 1:05d}", "priority": "vip",
                                      "weight": 1.0, "blocked": False, "queued": 0,
                                      "active": 0, "served": 0, "runtime": ["priority"]}})
        backend = json.dumps(controller.state["backends"][1])

        queueRead, resync = refreshRounds(users)

        def redraw() -> None:
            """
            One redraw from scratch (no cached canvases).
            """
            controller._draw()
            CanvasCache.clear()
            view.render((100, 30))

        for label, call in (
            ("event request.finished", lambda: controller.eventReceived("request.finished", finished)),
            ("event policy.changed (last user)", lambda: controller.eventReceived("policy.changed", policy)),
            ("event backend.changed", lambda: controller.eventReceived("backend.changed", backend)),
            ("redraw at 100x30", redraw),
            ("daemon: queue page re-read", queueRead),
            ("daemon: resync (users, backends)", resync),
        ):
            seconds = timeit(call, budget)
            results.append({"users": users, "operation": label,
                            "us_per_op": round(seconds * 1e6, 1)})
        controller.stop()

    print(f"Console cost per operation, Python {platform.python_version()} "
          f"(redraw at most every {DRAW_INTERVAL}s, listings at most every {REFRESH_INTERVAL}s)")
    print(f"{'users':>6}  {'operation':<34} {'us/op':>10}")
    print("-" * 53)
    for r in results:
        print(f"{r['users']:>6}  {r['operation']:<34} {r['us_per_op']:>10,.1f}")
    worst = max(r["us_per_op"] for r in results if r["operation"] == "redraw at 100x30")
    print(f"\nworst redraw: {worst / 1000:.1f} ms, i.e. {worst / 1e4 / DRAW_INTERVAL:.1f}% "
          f"of one core at the maximum redraw rate")
    queueCost = max(r["us_per_op"] for r in results if r["operation"] == "daemon: queue page re-read")
    resyncCost = max(r["us_per_op"] for r in results if r["operation"].startswith("daemon: resync"))
    share = queueCost / 1e4 / REFRESH_INTERVAL + resyncCost / 1e4 / RESYNC_INTERVAL
    print(f"daemon, per console under constant events: queue page {queueCost / 1000:.1f} ms every "
          f"{REFRESH_INTERVAL}s + resync {resyncCost / 1000:.1f} ms every {RESYNC_INTERVAL:g}s "
          f"= {share:.1f}% of one core at most (both ends of AMP counted)")

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "console.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"benchmark": "console",
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "python": platform.python_version(), "machine": platform.machine(),
                   "platform": platform.platform(), "budget_seconds_per_scenario": budget,
                   "draw_interval": DRAW_INTERVAL, "refresh_interval": REFRESH_INTERVAL,
                   "results": results}, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
