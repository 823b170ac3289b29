"""
Micro-benchmark of the control plane's costs on the request path and of its listings.

  - Request cycles (enqueue, grant, release) per second on a scheduler alone, with the
    control plane wired (actions and event hub, nobody subscribed), and with one AMP
    subscriber receiving every event over an in-memory connection (encoded, sent,
    answered).
  - Admission with 1,000 blocked networks of 9 prefix lengths: enqueues per second.
  - Listing 10,000 queued requests in dispatch order, and one page of it encoded for AMP.

Run: C{PYTHONPATH=. python bench/control.py}. Prints a table and writes
C{bench/results/control.json}.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import sys
import time
from typing import Any

from twisted.internet import task
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient

from ollamamq.backends import OLLAMA, Backend, BackendPool
from ollamamq.config import Config
from ollamamq.control import amp as commands
from ollamamq.control.actions import ControlActions
from ollamamq.control.events import EventHub
from ollamamq.control.server import ControlFactory
from ollamamq.scheduler import Job, Lease, Scheduler

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "control.json")
API = frozenset({OLLAMA})


class _NullStore:
    """
    Saves nothing (the benchmark never writes policy).
    """


class _Subscriber(amp.AMP):
    """
    A console that answers every event at once.
    """

    received = 0

    @commands.Event.responder
    def event(self, name: str, payload: str) -> dict:
        self.received += 1
        return {}


def _setup(wired: bool, subscribed: bool, queued: int = 0) -> tuple[Any, ...]:
    """
    A scheduler with one backend of 4 slots, optionally with the control plane and a
    subscriber.
    """
    clock = task.Clock()
    pool = BackendPool()
    backend = pool.add(Backend(name="b0", url="http://b0", slots=4))
    pool.markOnline(backend, OLLAMA, ["m"])
    config = Config(maxQueuedPerUser=queued + 10, maxQueuedTotal=queued + 100)
    scheduler = Scheduler(pool, clock, config)
    pump = client = None
    actions = None
    if wired:
        actions = None
        hub = EventHub(clock, lambda: actions.totals())
        actions = ControlActions(config=config, pool=pool, scheduler=scheduler,
                                 store=_NullStore(), events=hub)
        if subscribed:
            factory = ControlFactory(actions, hub)
            client, server, pump = connectedServerAndClient(
                lambda: factory.buildProtocol(None), _Subscriber
            )
            client.callRemote(commands.Subscribe)
            pump.flush()
    return clock, scheduler, actions, pump, client


def requestCycles(wired: bool, subscribed: bool, cycles: int) -> dict:
    """
    Enqueue, grant and release C{cycles} requests from 10 users, 4 at a time.
    """
    clock, scheduler, _, pump, client = _setup(wired, subscribed)
    leases: list[Lease] = []
    started = time.perf_counter()
    for i in range(cycles):
        scheduler.enqueue(Job(user=f"u{i % 10}", kinds=API, model="m:latest")).addCallback(
            leases.append
        )
        if len(leases) >= 4:
            leases.pop(0).release()
        if pump is not None and i % 32 == 0:
            pump.flush()
            clock.advance(0.5)
    while leases:
        leases.pop(0).release()
    if pump is not None:
        pump.flush()
    elapsed = time.perf_counter() - started
    result = {"cycles_per_s": cycles / elapsed, "us_per_cycle": elapsed / cycles * 1e6}
    if client is not None:
        result["events_received"] = client.received
    return result


def blockedAdmission(blocks: int, enqueues: int) -> dict:
    """
    Enqueue requests from unblocked addresses with C{blocks} blocked networks.
    """
    clock, scheduler, _, _, _ = _setup(False, False, queued=enqueues)
    lengths = [8, 12, 16, 20, 24, 28, 30, 31, 32]
    for i in range(blocks):
        length = lengths[i % len(lengths)]
        address = ipaddress.ip_address(0x0A000000 + i * 4096)
        scheduler.blockNetwork(ipaddress.ip_network((address, length), strict=False))
    started = time.perf_counter()
    for i in range(enqueues):
        d = scheduler.enqueue(Job(user=f"u{i % 100}", kinds=API, model="m:latest",
                                  peer=f"192.168.{i % 250}.{i % 200}"))
        d.addErrback(lambda f: None)
    elapsed = time.perf_counter() - started
    return {"enqueues_per_s": enqueues / elapsed, "blocked_networks": len(scheduler.blockedNetworks())}


def listing(queued: int, repeats: int) -> dict:
    """
    List C{queued} requests in dispatch order, and encode one AMP page of it.
    """
    clock, scheduler, actions, _, _ = _setup(True, False, queued=queued)
    for i in range(queued + 4):
        d = scheduler.enqueue(Job(user=f"u{i % 1000}", kinds=API, model="m:latest"))
        d.addErrback(lambda f: None)
    started = time.perf_counter()
    for _ in range(repeats):
        rows = actions.queue()
    listed = (time.perf_counter() - started) / repeats
    factory = ControlFactory(actions, actions.events)
    protocol = factory.buildProtocol(None)
    started = time.perf_counter()
    for _ in range(repeats):
        page = protocol.listQueue()
        amp.AmpList(commands.QUEUE_ROW).toStringProto(page["requests"], protocol)
    paged = (time.perf_counter() - started) / repeats
    return {"queued": len(rows), "list_ms": listed * 1e3, "page_ms": paged * 1e3,
            "page_rows": len(page["requests"])}


def main() -> dict:
    results = {
        "scheduler alone": requestCycles(False, False, 20_000),
        "control plane wired, no subscriber": requestCycles(True, False, 20_000),
        "one AMP subscriber": requestCycles(True, True, 20_000),
        "admission, 1,000 blocked networks": blockedAdmission(1_000, 5_000),
        "admission, no blocked network": blockedAdmission(0, 5_000),
        "queue listing, 10,000 queued": listing(10_000, 5),
    }
    for name, row in results.items():
        print(f"{name:40s} " + "  ".join(
            f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"python": sys.version.split()[0], "machine": platform.machine(),
                   "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
