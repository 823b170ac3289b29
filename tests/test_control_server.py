"""
Tests for L{ollamamq.control.server}: every AMP command over an in-memory connection
(L{twisted.test.iosim}), its errors, a failing responder, event delivery and a slow
subscriber; and the UNIX socket service (mode 0600, lockfile).
"""

from __future__ import annotations

import json
import os
import stat

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ollamamq.config import BackendConfig, Config, ConfigError, UserConfig
from ollamamq.control import amp as commands
from ollamamq.control import server
from ollamamq.control.server import ControlFactory, ControlProtocol, controlService

from .controlfixture import ControlFixture


class Client(amp.AMP):
    """
    A control client that records events; with C{hold}, it never answers them (a
    subscriber that stopped reading).
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict]] = []
        self.hold: list[Deferred] | None = None

    @commands.Event.responder
    def event(self, name: str, payload: str) -> dict | Deferred:
        self.events.append((name, json.loads(payload)))
        if self.hold is not None:
            d: Deferred = Deferred()
            self.hold.append(d)
            return d
        return {}


class CommandTests(SynchronousTestCase):
    """
    Each command over a connection, with its results and errors.
    """

    def setUp(self) -> None:
        self.f = ControlFixture(
            users={"alice": UserConfig(priority="normal", weight=1)},
        )
        factory = ControlFactory(self.f.actions, self.f.hub)
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), Client
        )

    def call(self, command: type[amp.Command], **kw: object) -> dict:
        """
        Call C{command} and return its answer.
        """
        d = self.client.callRemote(command, **kw)
        results: list = []
        d.addBoth(results.append)
        self.pump.flush()
        [result] = results
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def fails(self, error: type[Exception], command: type[amp.Command], **kw: object) -> str:
        """
        Call C{command}, check it fails with C{error}, and that the connection stays up.

        @return: the error's message.
        """
        failures: list[Failure] = []
        d = self.client.callRemote(command, **kw)
        d.addErrback(failures.append)
        self.pump.flush()
        [failure] = failures
        failure.trap(error)
        self.assertEqual(self.call(commands.Version)["protocol"], commands.PROTOCOL_VERSION)
        return str(failure.value)

    def test_version(self) -> None:
        """
        L{commands.Version} answers the protocol and daemon versions.
        """
        answer = self.call(commands.Version)
        self.assertEqual(answer["protocol"], commands.PROTOCOL_VERSION)
        self.assertIsInstance(answer["daemon"], str)

    def test_snapshot(self) -> None:
        """
        L{commands.Snapshot} answers the totals and backend rows.
        """
        self.f.enqueue("bob")
        self.f.enqueue("bob")
        answer = self.call(commands.Snapshot)
        self.assertEqual((answer["queued"], answer["active"]), (1, 1))
        self.assertEqual(answer["users"], 2)
        self.assertEqual(answer["blocked"], 0)
        [backend] = answer["backends"]
        self.assertEqual(backend["name"], "gpu1")
        self.assertEqual(backend["state"], "online")
        self.assertEqual(backend["models"], ["m"])
        self.assertEqual(backend["source"], "config")
        self.assertEqual(backend["active"], 1)

    def test_listUsersPaged(self) -> None:
        """
        L{commands.ListUsers} pages by offset and limit and says where the next page
        starts.
        """
        for i in range(5):
            self.call(commands.SetUser, user=f"u{i}", weight=2.0)
        first = self.call(commands.ListUsers, limit=4)
        self.assertEqual([u["id"] for u in first["users"]], ["alice", "u0", "u1", "u2"])
        self.assertEqual((first["total"], first["next"]), (6, 4))
        second = self.call(commands.ListUsers, offset=4)
        self.assertEqual([u["id"] for u in second["users"]], ["u3", "u4"])
        self.assertIsNone(second["next"])
        self.assertEqual(second["users"][0]["runtime"], ["weight"])
        self.assertEqual(second["users"][0]["weight"], 2.0)
        self.assertIn("offset", self.fails(commands.InvalidValue, commands.ListUsers, offset=-1))
        self.assertIn("limit", self.fails(commands.InvalidValue, commands.ListUsers, limit=0))

    def test_pageFitsOneValue(self) -> None:
        """
        A page whose rows would not fit in one AMP value is cut short; paging on gets
        every row.
        """
        longName = "x" * 250
        for i in range(300):
            self.f.scheduler.setPolicy(f"{longName}{i:03d}", weight=1)
        seen: list[str] = []
        offset: int | None = 0
        pages = 0
        while offset is not None:
            page = self.call(commands.ListUsers, offset=offset)
            seen.extend(u["id"] for u in page["users"])
            offset = page["next"]
            pages += 1
        self.assertEqual(len(seen), 301)
        self.assertGreater(pages, 2)

    def test_listQueue(self) -> None:
        """
        L{commands.ListQueue} lists queued requests in dispatch order, optionally one
        user's.
        """
        self.f.enqueue("alice", "r0")
        self.f.enqueue("alice", "r1", peer="10.0.0.1")
        self.f.enqueue("bob", "r2")
        self.f.clock.advance(1.5)
        answer = self.call(commands.ListQueue)
        self.assertEqual([(r["id"], r["position"]) for r in answer["requests"]],
                         [("r2", 1), ("r1", 2)])
        self.assertEqual(answer["requests"][1]["peer"], "10.0.0.1")
        self.assertEqual(answer["requests"][1]["waited"], 1.5)
        mine = self.call(commands.ListQueue, user="alice")
        self.assertEqual([r["id"] for r in mine["requests"]], ["r1"])
        self.assertEqual(mine["total"], 1)

    def test_setUser(self) -> None:
        """
        L{commands.SetUser} changes the given fields only and answers the row with the
        runtime fields; it is saved.
        """
        row = self.call(commands.SetUser, user="alice", priority="vip")
        self.assertEqual((row["priority"], row["weight"], row["runtime"]), ("vip", 1.0, ["priority"]))
        row = self.call(commands.SetUser, user="alice", weight=3.0, maxQueued=4)
        self.assertEqual((row["priority"], row["weight"], row["maxQueued"]), ("vip", 3.0, 4))
        self.assertEqual(row["runtime"], ["priority", "weight", "maxQueued"])
        row = self.call(commands.SetUser, user="alice", maxQueued=0)
        self.assertIsNone(row["maxQueued"])
        self.assertEqual(self.f.store.calls[-1][0], "putUser")

    def test_setUserErrors(self) -> None:
        """
        Bad values are refused naming the field, and nothing changes.
        """
        self.assertIn("priority", self.fails(commands.InvalidValue, commands.SetUser,
                                             user="alice", priority="gold"))
        self.assertIn("weight", self.fails(commands.InvalidValue, commands.SetUser,
                                           user="alice", weight=-1.0))
        self.assertIn("weight", self.fails(commands.InvalidValue, commands.SetUser,
                                           user="alice", weight=float("nan")))
        self.assertIn("max_queued", self.fails(commands.InvalidValue, commands.SetUser,
                                               user="alice", maxQueued=-2))
        self.assertIn("user", self.fails(commands.InvalidValue, commands.SetUser, user=""))
        self.assertEqual(self.f.actions.user("alice")["runtime"], [])

    def test_blockUser(self) -> None:
        """
        Blocking a user over the socket fails its queued requests with 403.
        """
        self.f.enqueue("bob")
        waiting = self.f.enqueue("bob")
        row = self.call(commands.SetUser, user="bob", blocked=True)
        self.assertTrue(row["blocked"])
        [failure] = waiting.outcome
        self.assertEqual(failure.value.status, 403)

    def test_clearUser(self) -> None:
        """
        L{commands.ClearUser} restores the config's values; unknown users are an error.
        """
        self.call(commands.SetUser, user="alice", priority="vip", blocked=True)
        row = self.call(commands.ClearUser, user="alice")
        self.assertEqual((row["priority"], row["blocked"], row["runtime"]), ("normal", False, []))
        self.assertIn("nobody", self.fails(commands.UnknownUser, commands.ClearUser, user="nobody"))

    def test_blockAddress(self) -> None:
        """
        Blocking and unblocking addresses, normalised; errors for bad and unknown ones.
        """
        waiting = self.f.enqueue("carol", peer="10.9.8.7")
        self.f.enqueue("carol", peer="10.9.8.7")
        row = self.call(commands.BlockAddress, address="10.9.8.7/16")
        self.assertEqual(row, {"address": "10.9.0.0/16", "source": "runtime"})
        self.assertEqual(self.call(commands.Snapshot)["blocked"], 1)
        listing = self.call(commands.ListBlocked)
        self.assertEqual(listing["addresses"], [row])
        self.assertEqual(self.call(commands.UnblockAddress, address="10.9.0.0/16"),
                         {"address": "10.9.0.0/16"})
        self.fails(commands.UnknownAddress, commands.UnblockAddress, address="10.9.0.0/16")
        self.fails(commands.InvalidValue, commands.BlockAddress, address="not-an-ip")
        self.assertTrue(waiting.called)

    def test_backends(self) -> None:
        """
        Adding, resizing, draining, undraining and removing a backend, with the errors
        for unknown and duplicate names and bad values.
        """
        row = self.call(commands.AddBackend, url="http://gpu2:11434/", name="gpu2", slots=2)
        self.assertEqual((row["name"], row["url"], row["slots"], row["source"]),
                         ("gpu2", "http://gpu2:11434", 2, "runtime"))
        self.assertEqual([b.name for b in self.f.probed], ["gpu2"])
        self.fails(commands.DuplicateBackend, commands.AddBackend, url="http://x:1", name="gpu2")
        self.assertIn("url", self.fails(commands.InvalidValue, commands.AddBackend, url="ftp://x"))
        self.assertIn("slots", self.fails(commands.InvalidValue, commands.AddBackend,
                                          url="http://x:1", slots=0))
        self.assertEqual(self.call(commands.SetSlots, name="gpu1", slots=3)["slots"], 3)
        self.fails(commands.InvalidValue, commands.SetSlots, name="gpu1", slots=0)
        self.assertTrue(self.call(commands.DrainBackend, name="gpu1")["draining"])
        self.assertFalse(self.f.pool.get("gpu1").available)
        self.assertFalse(self.call(commands.UndrainBackend, name="gpu1")["draining"])
        self.assertEqual(self.call(commands.RemoveBackend, name="gpu2"), {"name": "gpu2"})
        for command in (commands.RemoveBackend, commands.DrainBackend, commands.UndrainBackend):
            self.fails(commands.UnknownBackend, command, name="gpu2")
        self.fails(commands.UnknownBackend, commands.SetSlots, name="gpu2", slots=1)

    def test_cancelRequest(self) -> None:
        """
        L{commands.CancelRequest} cancels a queued request; unknown ids are an error.
        """
        self.f.enqueue("alice", "r0")
        waiting = self.f.enqueue("alice", "r1")
        self.assertEqual(self.call(commands.CancelRequest, id="r1"), {"id": "r1"})
        [failure] = waiting.outcome
        self.assertEqual(failure.value.code, "cancelled")
        self.fails(commands.UnknownRequest, commands.CancelRequest, id="r0")

    def test_reload(self) -> None:
        """
        L{commands.Reload} applies a new config and says what changed; a broken one is
        refused with the reason and changes nothing.
        """
        self.f.nextConfig = Config(
            backends=self.f.config.backends
            + (BackendConfig(url="http://gpu3:11434", name="gpu3"),),
            users={"alice": UserConfig(), "dave": UserConfig(priority="vip")},
        )
        answer = self.call(commands.Reload)
        self.assertEqual(answer["changes"], ["backend gpu3 added", "user dave added"])
        self.assertEqual(self.f.actions.user("dave")["priority"], "vip")
        self.f.nextConfig = ConfigError("users.x.weight: expected a positive number, got 0")
        message = self.fails(commands.ReloadFailed, commands.Reload)
        self.assertIn("users.x.weight", message)
        self.assertIn("gpu3", [b.name for b in self.f.pool.backends])
        self.flushLoggedErrors()

    def test_failingResponderKeepsConnection(self) -> None:
        """
        A responder that raises something its command does not declare answers
        L{commands.InternalError}; the failure is logged and the connection stays up.
        """

        self.f.pool._backends = None  # type: ignore[assignment]
        message = self.fails(commands.InternalError, commands.Snapshot)
        self.assertIn("Snapshot", message)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_unencodableResultKeepsConnection(self) -> None:
        """
        A result AMP cannot encode (a bug) is an L{commands.InternalError} too.
        """
        self.f.pool.get("gpu1").slots = "many"  # type: ignore[assignment]
        self.fails(commands.InternalError, commands.Snapshot)
        self.assertTrue(self.flushLoggedErrors())


class EventTests(SynchronousTestCase):
    """
    Subscriptions: events pushed as they happen, filters, totals, slow subscribers.
    """

    def setUp(self) -> None:
        self.f = ControlFixture()
        factory = ControlFactory(self.f.actions, self.f.hub)
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), Client
        )

    def call(self, command: type[amp.Command], **kw: object) -> dict:
        """
        Call C{command}, flush, return its answer.
        """
        d = self.client.callRemote(command, **kw)
        self.pump.flush()
        return self.successResultOf(d)

    def test_requestAndPolicyEvents(self) -> None:
        """
        A subscriber gets request, policy and backend events as they happen, and the
        coalesced totals at most twice a second.
        """
        self.assertEqual(self.call(commands.Subscribe), {"subscribed": True})
        self.f.enqueue("alice", "r0")
        self.f.enqueue("alice", "r1")
        self.call(commands.SetUser, user="alice", weight=2.0)
        # Draining the only backend also fails the request queued for it.
        self.call(commands.DrainBackend, name="gpu1")
        self.pump.flush()
        names = [name for name, _ in self.client.events]
        self.assertEqual(
            names,
            ["request.queued", "request.started", "request.queued", "policy.changed",
             "request.cancelled", "backend.changed"],
        )
        self.assertEqual(self.client.events[3][1]["user"]["weight"], 2.0)
        self.assertEqual(self.client.events[4][1]["reason"], "failed")
        self.assertTrue(self.client.events[5][1]["draining"])
        # The first totals after a quiet time go out on the next turn of the reactor.
        self.f.clock.advance(0)
        self.pump.flush()
        self.assertEqual(self.client.events[-1][0], "totals")
        self.assertEqual(self.client.events[-1][1]["queued"], 0)
        self.f.actions.drainBackend("gpu1", False)
        # Many changes within half a second: one more totals event, after the interval.
        for i in range(20):
            self.f.enqueue(f"u{i}")
        self.pump.flush()
        self.assertEqual(sum(n == "totals" for n, _ in self.client.events), 1)
        self.f.clock.advance(0.5)
        self.pump.flush()
        totals = [p for n, p in self.client.events if n == "totals"]
        self.assertEqual(len(totals), 2)
        self.assertEqual(totals[-1]["queued"], 20)

    def test_filterAndUnsubscribe(self) -> None:
        """
        A name filter keeps only the selected events; unsubscribing stops them.
        """
        self.call(commands.Subscribe, names=["backend", "policy.changed"])
        self.f.enqueue("alice")
        self.call(commands.SetUser, user="alice", weight=2.0)
        self.call(commands.DrainBackend, name="gpu1")
        self.pump.flush()
        self.assertEqual([n for n, _ in self.client.events], ["policy.changed", "backend.changed"])
        self.assertEqual(self.call(commands.Unsubscribe), {"subscribed": False})
        self.call(commands.UndrainBackend, name="gpu1")
        self.pump.flush()
        self.assertEqual(len(self.client.events), 2)

    def test_slowSubscriberBounded(self) -> None:
        """
        A subscriber that stops answering gets at most L{server.MAX_IN_FLIGHT} events;
        the rest are only counted (the daemon keeps nothing per event), and once it
        catches up it is told how many it missed.
        """
        self.call(commands.Subscribe, names=["request"])
        self.client.hold = []
        for i in range(5000):
            self.f.enqueue(f"u{i % 50}", f"r{i}")
        self.pump.flush()
        protocol: ControlProtocol = self.server
        self.assertEqual(len(self.client.events), server.MAX_IN_FLIGHT)
        self.assertEqual(protocol._inFlight, server.MAX_IN_FLIGHT)
        self.assertEqual(len(protocol._outstandingRequests), server.MAX_IN_FLIGHT)
        self.assertEqual(len(self.server.transport.stream), 0)
        missed = protocol._dropped
        self.assertGreater(missed, 4000)
        held, self.client.hold = self.client.hold, None
        for d in held:
            d.callback({})
        self.pump.flush()
        name, payload = self.client.events[-1]
        self.assertEqual((name, payload), ("events.dropped", {"count": missed}))
        self.f.enqueue("late", "rl")
        self.pump.flush()
        self.assertEqual(self.client.events[-1][1]["id"], "rl")

    def test_disconnectUnsubscribes(self) -> None:
        """
        A subscriber that disconnects is forgotten by the hub.
        """
        self.call(commands.Subscribe)
        self.assertEqual(self.f.hub.subscribers, 2)
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.f.hub.subscribers, 1)
        self.f.enqueue("alice")
        self.pump.flush()


class SocketTests(TestCase):
    """
    The control socket service on a real UNIX socket.
    """

    def setUp(self) -> None:
        self.f = ControlFixture()
        self.path = os.path.join(self.mktemp())
        self.factory = ControlFactory(self.f.actions, self.f.hub)

    async def test_modeAndCleanup(self) -> None:
        """
        The socket is created 0600, answers commands, and is removed (with its lock) on
        stop.
        """
        service = controlService(reactor, self.path, self.factory)
        service.privilegedStartService()
        service.startService()
        try:
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
            self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
            client = await connectProtocol(UNIXClientEndpoint(reactor, self.path), amp.AMP())
            answer = await client.callRemote(commands.Version)
            self.assertEqual(answer["protocol"], commands.PROTOCOL_VERSION)
            client.transport.loseConnection()
        finally:
            await service.stopService()
        self.assertFalse(os.path.exists(self.path))
        self.assertFalse(os.path.lexists(self.path + ".lock"))

    async def test_liveSocketRefused(self) -> None:
        """
        A second listener on a socket held by a live daemon fails at once; a stale one
        (its lock naming a dead process) is replaced.
        """
        first = controlService(reactor, self.path, self.factory)
        first.privilegedStartService()
        self.addCleanup(first.stopService)
        second = controlService(reactor, self.path, self.factory)
        error = self.assertRaises(SystemExit, second.privilegedStartService)
        self.assertIn("belongs to another running ollamamq", str(error))
        await first.stopService()
        # A crash leaves the socket and a lock naming a process that is gone.
        import socket as socketModule

        leftover = socketModule.socket(socketModule.AF_UNIX)
        leftover.bind(self.path)
        leftover.close()
        os.symlink("999999999", self.path + ".lock")
        third = controlService(reactor, self.path, self.factory)
        third.privilegedStartService()
        self.addCleanup(third.stopService)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
