"""
Tests for L{ollamamq.console.app}: the controller against a daemon double that speaks the
real AMP commands of L{ollamamq.control.amp} over C{iosim}, on a C{task.Clock}.

The double answers from a small in-memory state the test sets; the console against the
real daemon (L{ollamamq.control.server}) is in L{tests.test_console_daemon}.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from twisted.internet import error as netError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from urwid.testing import render_text

from ollamamq.console import app
from ollamamq.console.widgets import Action, ConsoleView
from ollamamq.control import amp as commands

SIZE = (80, 24)


def userRow(ident: str, **changes: Any) -> dict:
    """
    A L{commands.USER_ROW} dict.
    """
    row = {"id": ident, "priority": "normal", "weight": 1.0, "maxQueued": None,
           "blocked": False, "queued": 0, "active": 0, "served": 0, "runtime": []}
    row.update(changes)
    return row


def backendRow(name: str, **changes: Any) -> dict:
    """
    A L{commands.BACKEND_ROW} dict.
    """
    row = {"name": name, "url": f"http://{name}:11434", "state": "online", "online": True,
           "kind": "ollama", "slots": 2, "active": 0, "draining": False,
           "models": ["llama3:latest"], "loaded": [], "error": None, "source": "config"}
    row.update(changes)
    return row


class FakeDaemon(amp.AMP):
    """
    The daemon's end of one control connection, answering from C{state}: a dict of
    C{backends}, C{users} (by id), C{queue} and C{blocked} lists shared by every
    connection of one test (not C{self.state}: AMP uses that name).
    """

    def __init__(self, state: dict) -> None:
        super().__init__()
        self.world = state
        self.subscribed = False
        self.received: list[tuple[str, dict]] = []
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:
        """
        Fire C{self.lost}.
        """
        super().connectionLost(reason)
        self.lost.callback(None)

    def _page(self, rows: list, offset: int | None, limit: int | None) -> tuple[list, int | None]:
        """
        One page of C{rows} as the daemon cuts it (C{pageSize} in the state shortens pages).
        """
        offset = offset or 0
        limit = min(limit or commands.PAGE_LIMIT, self.world.get("pageSize", commands.PAGE_LIMIT))
        page = rows[offset:offset + limit]
        nxt = offset + limit if offset + limit < len(rows) else None
        return page, nxt

    @commands.Version.responder
    def version(self) -> dict:
        """
        Answer L{commands.Version}.
        """
        self.received.append(("Version", {}))
        return {"protocol": self.world.get("protocol", commands.PROTOCOL_VERSION),
                "daemon": "9.9.9"}

    @commands.Subscribe.responder
    def subscribe(self, names: list | None = None) -> dict:
        """
        Answer L{commands.Subscribe}: events may be pushed from now on.
        """
        self.received.append(("Subscribe", {}))
        self.subscribed = True
        return {"subscribed": True}

    @commands.Snapshot.responder
    def snapshot(self) -> dict:
        """
        Answer L{commands.Snapshot} from the state.
        """
        self.received.append(("Snapshot", {}))
        return {"queued": len(self.world["queue"]), "active": 0,
                "users": len(self.world["users"]), "blocked": len(self.world["blocked"]),
                "backends": self.world["backends"], "uptime": self.world.get("uptime", 0.0)}

    @commands.ListUsers.responder
    def listUsers(self, offset: int | None = None, limit: int | None = None) -> dict:
        """
        Answer a page of L{commands.ListUsers}, by id.
        """
        self.received.append(("ListUsers", {"offset": offset}))
        rows = [self.world["users"][k] for k in sorted(self.world["users"])]
        page, nxt = self._page(rows, offset, limit)
        return {"users": page, "total": len(rows), "next": nxt}

    @commands.ListQueue.responder
    def listQueue(self, offset: int | None = None, limit: int | None = None,
                  user: str | None = None) -> dict:
        """
        Answer a page of L{commands.ListQueue}.
        """
        self.received.append(("ListQueue", {"offset": offset}))
        page, nxt = self._page(self.world["queue"], offset, limit)
        return {"requests": page, "total": len(self.world["queue"]), "next": nxt}

    @commands.ListBlocked.responder
    def listBlocked(self, offset: int | None = None, limit: int | None = None) -> dict:
        """
        Answer a page of L{commands.ListBlocked}.
        """
        self.received.append(("ListBlocked", {"offset": offset}))
        rows = [{"address": a, "source": "runtime"} for a in self.world["blocked"]]
        page, nxt = self._page(rows, offset, limit)
        return {"addresses": page, "total": len(rows), "next": nxt}

    @commands.SetUser.responder
    def setUser(self, user: str, priority: str | None = None, weight: float | None = None,
                maxQueued: int | None = None, blocked: bool | None = None) -> dict:
        """
        Answer L{commands.SetUser}, refusing an unknown priority as the daemon does.
        """
        self.received.append(("SetUser", {"user": user, "priority": priority, "weight": weight,
                                          "blocked": blocked}))
        if priority not in (None, "vip", "boost", "normal"):
            raise commands.InvalidValue(f"priority: unknown {priority!r}")
        row = self.world["users"].setdefault(user, userRow(user))
        for key, value in (("priority", priority), ("weight", weight), ("blocked", blocked)):
            if value is not None:
                row[key] = value
        return row

    @commands.BlockAddress.responder
    def blockAddress(self, address: str) -> dict:
        """
        Answer L{commands.BlockAddress}.
        """
        self.received.append(("BlockAddress", {"address": address}))
        self.world["blocked"].append(address)
        return {"address": address, "source": "runtime"}

    @commands.UnblockAddress.responder
    def unblockAddress(self, address: str) -> dict:
        """
        Answer L{commands.UnblockAddress}; an address not blocked is an error.
        """
        self.received.append(("UnblockAddress", {"address": address}))
        if address not in self.world["blocked"]:
            raise commands.UnknownAddress(f"{address} is not blocked at runtime")
        self.world["blocked"].remove(address)
        return {"address": address}

    def _backend(self, name: str) -> dict:
        """
        The backend named C{name}, or L{commands.UnknownBackend}.
        """
        for b in self.world["backends"]:
            if b["name"] == name:
                return b
        raise commands.UnknownBackend(f"no backend named {name!r}")

    @commands.DrainBackend.responder
    def drain(self, name: str) -> dict:
        """
        Answer L{commands.DrainBackend}.
        """
        self.received.append(("DrainBackend", {"name": name}))
        backend = self._backend(name)
        backend["draining"] = True
        return backend

    @commands.UndrainBackend.responder
    def undrain(self, name: str) -> dict:
        """
        Answer L{commands.UndrainBackend}.
        """
        self.received.append(("UndrainBackend", {"name": name}))
        backend = self._backend(name)
        backend["draining"] = False
        return backend

    @commands.CancelRequest.responder
    def cancel(self, id: str) -> dict:
        """
        Answer L{commands.CancelRequest}; a request not queued is an error.
        """
        self.received.append(("CancelRequest", {"id": id}))
        for q in self.world["queue"]:
            if q["id"] == id:
                self.world["queue"].remove(q)
                return {"id": id}
        raise commands.UnknownRequest(f"no queued request {id!r}")

    @commands.Reload.responder
    def reload(self) -> dict:
        """
        Answer L{commands.Reload}, or fail with C{reloadError} when the state has one.
        """
        self.received.append(("Reload", {}))
        if self.world.get("reloadError"):
            raise commands.ReloadFailed(self.world["reloadError"])
        return {"changes": ["backend gpu3 added"]}

    def push(self, name: str, payload: dict) -> None:
        """
        Send an event to the console, as the daemon does.
        """
        self.callRemote(commands.Event, name=name, payload=json.dumps(payload))


class DaemonEndpoint:
    """
    A client endpoint that connects to a new daemon-side protocol over an iosim pump
    (a L{FakeDaemon} on C{state}, or what C{makeServer} builds), or fails with
    C{self.failure} while it is set.
    """

    def __init__(self, state: dict | None = None, makeServer: Any = None) -> None:
        self.state = state
        self.makeServer = makeServer or (lambda: FakeDaemon(self.state))
        self.failure: Exception | None = None
        self.daemons: list[Any] = []
        self.pumps: list[iosim.IOPump] = []
        self.attempts = 0

    def connect(self, factory: Any) -> Any:
        """
        Connect C{factory}'s protocol to a new daemon end, or fail.
        """
        self.attempts += 1
        if self.failure is not None:
            return fail(self.failure)
        client = factory.buildProtocol(None)
        daemon = self.makeServer()
        pump = iosim.connect(daemon, iosim.makeFakeServer(daemon), client,
                             iosim.makeFakeClient(client), greet=False)
        self.daemons.append(daemon)
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        """
        Move every pending byte on every connection.
        """
        for pump in self.pumps:
            pump.flush()


def initialState() -> dict:
    """
    Two backends, two users (bob with a queued request), one blocked address.
    """
    return {
        "backends": [backendRow("gpu1"), backendRow("gpu2", state="offline", online=False)],
        "users": {"alice": userRow("alice", served=3), "bob": userRow("bob", queued=1)},
        "queue": [{"id": "r1", "position": 1, "user": "bob", "model": "llama3",
                   "waited": 4.0, "peer": "10.0.0.7"}],
        "blocked": ["10.9.9.9"],
    }


class ControllerTestCase(SynchronousTestCase):
    """
    A controller with its view on a clock, connected to a fake daemon by iosim.
    """

    def setUp(self) -> None:
        """
        Build the pieces the tests share.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.state = initialState()
        self.endpoint = DaemonEndpoint(self.state)
        self.view = ConsoleView(lambda action: None, utf8=True, clock=self.clock.seconds)
        self.draws: list[float] = []
        self.exits: list[bool] = []
        self.controller = app.ConsoleController(
            self.view, self.endpoint, self.clock, "/run/ollamamq/control.sock",
            redraw=lambda: self.draws.append(self.clock.seconds()),
            exit=lambda: self.exits.append(True), jitter=lambda: 0.0,
        )
        self.addCleanup(self.controller.stop)

    def settle(self, seconds: float = 1.0) -> None:
        """
        Let bytes flow and time pass in small steps.
        """
        for _ in range(int(seconds / 0.05)):
            self.endpoint.flush()
            self.clock.advance(0.05)
            self.endpoint.flush()

    def start(self) -> FakeDaemon:
        """
        Start the controller and let it attach; return the daemon end.
        """
        self.controller.start()
        self.settle()
        return self.endpoint.daemons[-1]

    def screen(self) -> str:
        """
        The view as text at 80x24.
        """
        return "\n".join(render_text(self.view, SIZE))

    def status(self) -> str:
        """
        The status line.
        """
        return render_text(self.view, SIZE)[-1].strip()

    def act(self, name: str, label: str = "", **args: Any) -> None:
        """
        Perform an action as a key would, and let the answer arrive.
        """
        self.controller.perform(Action(name, args, label))
        self.settle(0.5)


class AttachTests(ControllerTestCase):
    """
    Connecting, the first snapshot, and pushed events.
    """

    def test_attach(self) -> None:
        """
        On connecting the console asks the version, subscribes, then reads the snapshot
        and every listing, and shows them.
        """
        daemon = self.start()
        names = [name for name, _ in daemon.received]
        self.assertEqual(names[:2], ["Version", "Subscribe"])
        self.assertEqual(sorted(names[2:]), ["ListBlocked", "ListQueue", "ListUsers", "Snapshot"])
        text = self.screen()
        self.assertIn("ollamamq 9.9.9 up 0s", text)
        self.assertRegex(text, r"● gpu1 +online")
        self.assertRegex(text, r"○ gpu2 +offline")
        self.assertRegex(text, r"bob +normal .* wait 4s")
        self.assertRegex(text, r"1 bob +llama3 +4s")
        self.assertIn("✖ ip   10.9.9.9", text)
        self.assertIn("Attached to /run/ollamamq/control.sock.", text)
        self.assertTrue(self.draws)

    def test_pagedListings(self) -> None:
        """
        Listings longer than a page are read page by page.
        """
        self.state["pageSize"] = 2
        self.state["users"].update({f"u{i}": userRow(f"u{i}") for i in range(5)})
        daemon = self.start()
        offsets = [args["offset"] for name, args in daemon.received if name == "ListUsers"]
        self.assertEqual(offsets, [0, 2, 4, 6])
        self.assertIn("Users (7)", self.screen())

    def test_longListingsCapped(self) -> None:
        """
        Past MAX_USERS the console reads no more users, and says how many there are.
        """
        self.patch(app, "MAX_USERS", 3)
        self.state["pageSize"] = 2
        self.state["users"].update({f"u{i}": userRow(f"u{i}") for i in range(5)})
        daemon = self.start()
        offsets = [args["offset"] for name, args in daemon.received if name == "ListUsers"]
        self.assertEqual(offsets, [0, 2])
        self.assertIn("Users (3 of 7)", self.screen())

    def test_protocolMismatch(self) -> None:
        """
        A daemon with another protocol version is used, with a warning.
        """
        self.state["protocol"] = commands.PROTOCOL_VERSION + 1
        self.start()
        self.assertIn(f"control protocol {commands.PROTOCOL_VERSION + 1}", self.screen())

    def test_eventsPatchAndRefresh(self) -> None:
        """
        A pushed backend or policy change shows at once (no command sent); request
        events make the users, queue and snapshot be read again, once for a burst.
        """
        daemon = self.start()
        before = len(daemon.received)
        daemon.push("backend.changed", backendRow("gpu2", state="online", online=True))
        daemon.push("policy.changed", {"user": userRow("alice", priority="vip")})
        self.settle(0.2)
        self.assertEqual(len(daemon.received), before)
        text = self.screen()
        self.assertRegex(text, r"● gpu2 +online")
        self.assertRegex(text, r"◆○ +alice +vip")
        self.assertIn("alice: vip, weight 1", text)
        self.state["queue"].append({"id": "r2", "position": 2, "user": "alice", "model": "m",
                                    "waited": 0.0, "peer": "10.0.0.8"})
        for i in range(20):
            daemon.push("request.queued", {"id": f"x{i}", "user": "alice", "model": "m",
                                           "peer": "10.0.0.8", "queued": 1})
        self.settle(1.0)
        # Only the queue's first page is read again, once; alice's count comes from the
        # events themselves.
        fetched = [name for name, _ in daemon.received[before:]]
        self.assertEqual(fetched, ["ListQueue"])
        self.assertRegex(self.screen(), r"2 alice +m ")
        self.assertRegex(self.screen(), r"alice +vip +w1 +q1 ")

    def test_requestEventsCounted(self) -> None:
        """
        started, finished and cancelled move the user's and the backend's counts
        without asking the daemon for users or backends; a user the console does not
        know yet makes it read the users.
        """
        daemon = self.start()
        before = len(daemon.received)
        self.state["queue"].clear()
        daemon.push("request.started", {"id": "r1", "user": "bob", "model": "llama3",
                                        "backend": "gpu1", "waited": 4.0})
        self.settle(0.1)
        text = self.screen()
        self.assertRegex(text, r"bob +normal +w1 +q0 +run1 +served 1 ")
        self.assertRegex(text, r"● gpu1 +online +ollama 1/2")
        self.assertIn("Queue (0)", text)
        daemon.push("request.finished", {"id": "r1", "user": "bob", "model": "llama3",
                                         "backend": "gpu1", "duration": 2.0})
        self.settle(1.0)
        text = self.screen()
        self.assertRegex(text, r"bob +normal +w1 +q0 +run0 +served 1 ")
        self.assertRegex(text, r"● gpu1 +online +ollama 0/2")
        fetched = {name for name, _ in daemon.received[before:]}
        self.assertEqual(fetched, {"ListQueue"})
        self.state["users"]["zoe"] = userRow("zoe", queued=1, priority="vip")
        daemon.push("request.queued", {"id": "z1", "user": "zoe", "model": "m",
                                       "peer": "10.0.0.5", "queued": 1})
        self.settle(1.0)
        self.assertIn("ListUsers", {name for name, _ in daemon.received[before:]})
        self.assertRegex(self.screen(), r"zoe +vip")

    def test_resync(self) -> None:
        """
        While request events flow, users and backends are read again every
        RESYNC_INTERVAL (correcting counts events cannot know); when idle, never.
        """
        daemon = self.start()
        before = len(daemon.received)
        self.settle(app.RESYNC_INTERVAL + 1)
        self.assertEqual(daemon.received[before:], [])
        self.state["users"]["bob"]["served"] = 7
        daemon.push("request.finished", {"id": "x", "user": "bob", "model": "m",
                                         "backend": "gpu1", "duration": 1.0})
        self.settle(app.RESYNC_INTERVAL + 1)
        fetched = [name for name, _ in daemon.received[before:]]
        self.assertEqual(sorted(fetched), ["ListUsers", "Snapshot"])
        self.assertRegex(self.screen(), r"bob .* served 7 ")

    def test_redrawsAreThrottled(self) -> None:
        """
        However many events arrive, the screen is drawn at most every DRAW_INTERVAL.
        """
        daemon = self.start()
        self.draws.clear()
        for i in range(200):
            daemon.push("request.finished", {"id": f"x{i}", "user": "bob", "model": "m",
                                             "backend": "gpu1", "duration": 1.0})
            self.endpoint.flush()
            self.clock.advance(0.01)
        gaps = [b - a for a, b in zip(self.draws, self.draws[1:])]
        self.assertTrue(self.draws)
        self.assertGreaterEqual(min(gaps), app.DRAW_INTERVAL - 1e-9)
        self.assertLessEqual(len(self.draws), 2 / app.DRAW_INTERVAL + 1)

    def test_rates(self) -> None:
        """
        Finished requests per second (averaged over RATE_WINDOW ticks) and the tokens
        they report give the header's rates and history.
        """
        daemon = self.start()
        # Ticks fall on whole seconds after the start (1000): be between two, one done.
        self.clock.advance(1001.5 - self.clock.seconds())
        for i in range(10):
            daemon.push("request.finished", {"id": f"x{i}", "user": "bob", "model": "m",
                                             "backend": "gpu1", "duration": 1.0,
                                             "tokens": {"prompt": 5, "completion": 20}})
        self.endpoint.flush()
        self.clock.advance(app.TICK_INTERVAL)
        self.clock.advance(0)
        # Two ticks so far, one with the ten requests.
        header = render_text(self.view, SIZE)[0]
        self.assertIn("5.0 req/s 100 tok/s", header)
        for _ in range(app.RATE_WINDOW - 1):
            self.clock.advance(app.TICK_INTERVAL)
        self.clock.advance(0)
        header = render_text(self.view, SIZE)[0]
        self.assertIn("2.0 req/s 40.0 tok/s", header)
        self.assertEqual(list(self.controller.history)[-5:], [10.0, 0.0, 0.0, 0.0, 0.0])
        self.clock.advance(app.TICK_INTERVAL)
        self.clock.advance(0)
        self.assertIn("0 req/s - tok/s", render_text(self.view, SIZE)[0])

    def test_accountedTokensAndUptime(self) -> None:
        """
        The daemon's uptime comes with the snapshot; token counts come with
        C{request.accounted} events (sent once a request's counts are known) and make the
        header's token rate.
        """
        self.state["uptime"] = 7500.0
        daemon = self.start()
        self.assertIn("up 2h05m", render_text(self.view, SIZE)[0])
        self.clock.advance(1001.5 - self.clock.seconds())
        for i in range(10):
            daemon.push("request.finished", {"id": f"x{i}", "user": "bob", "model": "m",
                                             "backend": "gpu1", "duration": 1.0})
            daemon.push("request.accounted", {"id": f"x{i}", "user": "bob", "model": "m",
                                              "tokens": {"prompt": 5, "completion": 20}})
        self.endpoint.flush()
        self.clock.advance(app.TICK_INTERVAL)
        self.clock.advance(0)
        self.assertIn("5.0 req/s 100 tok/s", render_text(self.view, SIZE)[0])

    def test_droppedEventsResync(self) -> None:
        """
        events.dropped and config.reloaded make the console read everything again.
        """
        daemon = self.start()
        before = len(daemon.received)
        daemon.push("events.dropped", {"count": 12})
        self.settle(1.0)
        fetched = sorted(name for name, _ in daemon.received[before:])
        self.assertEqual(fetched, ["ListBlocked", "ListQueue", "ListUsers", "Snapshot"])
        self.assertIn("12 events missed", self.screen())

    def test_badEventPayload(self) -> None:
        """
        An event whose payload is not JSON is shown raw, and nothing breaks.
        """
        daemon = self.start()
        daemon.callRemote(commands.Event, name="weird", payload="not json")
        self.settle(0.3)
        self.assertIn("weird raw=not json", self.screen())


class ActionTests(ControllerTestCase):
    """
    Each action sends its command; the answer or the daemon's error is in the status line.
    """

    def test_priority(self) -> None:
        """
        A priority change is a SetUser with just the priority; the answer shows at once.
        """
        daemon = self.start()
        self.act("priority", "alice: priority vip", user="alice", priority="vip")
        self.assertIn(("SetUser", {"user": "alice", "priority": "vip", "weight": None,
                                   "blocked": None}), daemon.received)
        self.assertIn("alice: priority vip, weight 1", self.status())
        self.assertRegex(self.screen(), r"◆○ +alice +vip")

    def test_weightAndBlock(self) -> None:
        """
        Weight, block and unblock are SetUser calls with those fields only.
        """
        daemon = self.start()
        self.act("weight", user="bob", weight=3.0)
        self.act("block", user="bob")
        self.assertIn("bob: priority normal, weight 3, blocked", self.status())
        self.act("unblock", user="bob")
        sent = [args for name, args in daemon.received if name == "SetUser"]
        self.assertEqual(sent, [
            {"user": "bob", "priority": None, "weight": 3.0, "blocked": None},
            {"user": "bob", "priority": None, "weight": None, "blocked": True},
            {"user": "bob", "priority": None, "weight": None, "blocked": False},
        ])

    def test_addresses(self) -> None:
        """
        Blocking and unblocking an address; an unknown one is the daemon's error.
        """
        daemon = self.start()
        self.act("blockIP", user="bob", ip="10.0.0.7")
        self.assertIn("10.0.0.7 blocked", self.status())
        self.assertIn("✖ ip   10.0.0.7", self.screen())
        self.act("unblockIP", "unblock IP 10.0.0.7", ip="10.0.0.7")
        self.assertIn("10.0.0.7 unblocked", self.status())
        self.act("unblockIP", "unblock IP 10.1.1.1", ip="10.1.1.1")
        self.assertIn("unblock IP 10.1.1.1 failed: 10.1.1.1 is not blocked at runtime",
                      self.status())
        self.assertIn(("BlockAddress", {"address": "10.0.0.7"}), daemon.received)

    def test_drainUnknownBackend(self) -> None:
        """
        Drain and undrain show the new state; an unknown backend is the daemon's error.
        """
        self.start()
        self.act("drain", "drain gpu1", backend="gpu1")
        self.assertIn("gpu1: draining", self.status())
        self.assertRegex(self.screen(), r"◌ gpu1 +draining")
        self.act("undrain", "undrain gpu1", backend="gpu1")
        self.assertIn("gpu1: taking requests", self.status())
        self.act("drain", "drain gpu9", backend="gpu9")
        self.assertIn("drain gpu9 failed: no backend named 'gpu9'", self.status())
        self.assertEqual(render_text(self.view, SIZE)[-1][:1], " ")

    def test_cancel(self) -> None:
        """
        Cancelling removes the request; one that already left the queue is an error.
        """
        self.start()
        self.act("cancel", "cancel request r1 of bob", request="r1")
        self.assertIn("request r1 cancelled", self.status())
        self.settle(1.0)
        self.assertIn("Queue (0)", self.screen())
        self.act("cancel", "cancel request r1 of bob", request="r1")
        self.assertIn("cancel request r1 of bob failed: no queued request 'r1'", self.status())

    def test_reload(self) -> None:
        """
        A reload lists what changed; a failed reload shows the daemon's reason.
        """
        self.start()
        self.act("reload", "reload config")
        self.assertIn("config reloaded: backend gpu3 added", self.status())
        self.state["reloadError"] = "line 3: unknown key 'tiemout'"
        self.act("reload", "reload config")
        self.assertIn("reload config failed: line 3: unknown key 'tiemout'", self.status())

    def test_invalidValue(self) -> None:
        """
        A value the daemon refuses is shown with its message; the connection stays up.
        """
        daemon = self.start()
        self.act("priority", "x", user="alice", priority="gold")
        self.assertIn("x failed: priority: unknown 'gold'", self.status())
        self.act("priority", "y", user="alice", priority="vip")
        self.assertIn("alice: priority vip", self.status())
        self.assertEqual(len(self.endpoint.daemons), 1)
        self.assertTrue(daemon.subscribed)

    def test_notConnected(self) -> None:
        """
        An action while detached says so, and nothing is sent.
        """
        self.endpoint.failure = netError.ConnectError(osError=errno.ENOENT)
        self.controller.start()
        self.settle(0.2)
        self.act("drain", "drain gpu1", backend="gpu1")
        self.assertIn("drain gpu1: not connected to the daemon.", self.status())

    def test_quit(self) -> None:
        """
        Quitting disconnects and leaves the console; the daemon gets no command for it.
        """
        daemon = self.start()
        before = len(daemon.received)
        self.controller.perform(Action("quit"))
        self.settle(0.2)
        self.assertEqual(self.exits, [True])
        self.assertEqual(len(daemon.received), before)
        self.assertIsNone(self.controller.protocol)


class ReconnectTests(ControllerTestCase):
    """
    An absent socket, a daemon that goes away, and permission errors.
    """

    def test_absentThenUp(self) -> None:
        """
        While the socket is absent the banner says so and retries with growing delays;
        once the daemon is there the console attaches by itself.
        """
        self.endpoint.failure = netError.ConnectError(osError=errno.ENOENT)
        self.controller.start()
        self.settle(0.1)
        self.assertIn("No daemon: /run/ollamamq/control.sock does not exist. Retrying in 0.5s.",
                      self.screen())
        self.settle(0.6)
        self.assertIn("Retrying in 1.0s.", self.screen())
        self.settle(1.1)
        self.assertIn("Retrying in 2.0s.", self.screen())
        self.assertEqual(self.endpoint.attempts, 3)
        self.endpoint.failure = None
        self.settle(2.5)
        self.assertEqual(len(self.endpoint.daemons), 1)
        self.assertIn("◆vip", self.screen())
        self.assertRegex(self.screen(), r"● gpu1 +online")

    def test_daemonRestarts(self) -> None:
        """
        When the connection drops the console says so, reconnects, subscribes again and
        shows the new daemon's state.
        """
        first = self.start()
        first.transport.loseConnection()
        self.endpoint.failure = netError.ConnectionRefusedError()
        self.settle(0.1)
        self.assertIsNone(self.controller.protocol)
        self.assertIn("The daemon went away (/run/ollamamq/control.sock): reconnecting...",
                      self.screen())
        self.settle(2 * app.RETRY_INITIAL + 0.1)
        self.assertIn("No daemon answers on /run/ollamamq/control.sock", self.screen())
        self.state["backends"].append(backendRow("gpu3"))
        self.endpoint.failure = None
        self.settle(3.0)
        self.assertEqual(len(self.endpoint.daemons), 2)
        self.assertTrue(self.endpoint.daemons[-1].subscribed)
        self.assertRegex(self.screen(), r"● gpu3 +online")
        self.assertIn("◆vip", self.screen())

    def test_backoffCapped(self) -> None:
        """
        The retry delay doubles up to RETRY_MAX and stays there.
        """
        self.endpoint.failure = netError.ConnectError(osError=errno.ENOENT)
        self.controller.start()
        for _ in range(12):
            self.clock.advance(app.RETRY_MAX)
        self.assertEqual(self.controller.retryDelay, app.RETRY_MAX)
        self.assertLessEqual(self.endpoint.attempts, 13)

    def test_explanations(self) -> None:
        """
        Each way of failing to reach the socket is told in words the operator can act on.
        """
        path = "/run/ollamamq/control.sock"
        cases = [
            (netError.ConnectError(osError=errno.EACCES),
             f"Permission denied on {path}: run the console as the daemon's user or root."),
            (PermissionError(errno.EACCES, "Permission denied"),
             f"Permission denied on {path}: run the console as the daemon's user or root."),
            (netError.ConnectError(osError=errno.ENOENT), f"No daemon: {path} does not exist."),
            (netError.ConnectionRefusedError(), f"No daemon answers on {path} (stale socket)."),
            (netError.ConnectError("weird"), f"Cannot connect to {path}: An error occurred while "
                                              "connecting: weird."),
        ]
        for exception, text in cases:
            self.assertEqual(app.explainConnectFailure(Failure(exception), path), text)

    def test_permissionBanner(self) -> None:
        """
        A permission error is on screen, and the console keeps trying (the operator may
        fix the socket's mode).
        """
        self.endpoint.failure = netError.ConnectError(osError=errno.EACCES)
        self.controller.start()
        self.settle(0.1)
        self.assertIn("Permission denied on /run/ollamamq/control.sock", self.screen())
        self.endpoint.failure = None
        self.settle(1.0)
        self.assertEqual(len(self.endpoint.daemons), 1)


class OptionsTests(SynchronousTestCase):
    """
    The command line.
    """

    def test_default(self) -> None:
        """
        Without --control the socket is $OLLAMAMQ_CONTROL, else ollamamq.sock.
        """
        self.patch(app.os, "environ", {})
        options = app.Options()
        options.parseOptions([])
        self.assertEqual(options["control"], "ollamamq.sock")
        self.patch(app.os, "environ", {"OLLAMAMQ_CONTROL": "/run/x.sock"})
        options = app.Options()
        options.parseOptions([])
        self.assertEqual(options["control"], "/run/x.sock")

    def test_control(self) -> None:
        """
        --control names the socket.
        """
        options = app.Options()
        options.parseOptions(["--control", "/tmp/a.sock"])
        self.assertEqual(options["control"], "/tmp/a.sock")

    def test_pathTooLong(self) -> None:
        """
        A socket path longer than a UNIX socket address holds is refused with a reason.
        """
        options = app.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions,
                                  ["--control", "/tmp/" + "d" * 120 + "/control.sock"])
        self.assertIn("a UNIX socket path has at most 107 bytes", str(error))

    def test_badOption(self) -> None:
        """
        An unknown option is a usage error with exit status 2.
        """
        import io

        stderr = io.StringIO()
        self.patch(app.sys, "stderr", stderr)
        self.assertEqual(app.main(["--bogus"]), 2)
        self.assertIn("ollamamq-console: option --bogus not recognized", stderr.getvalue())


class MainLoopTests(SynchronousTestCase):
    """
    The whole program loop: urwid's MainLoop on TwistedEventLoop over a memory reactor,
    keys from a ScriptedScreen, the controller talking to the fake daemon over iosim.
    """

    def startLoop(self, inputs: list[list[str]], size: tuple[int, int] = SIZE,
                  resizeTo: tuple[int, int] | None = None) -> None:
        """
        Build and start the program's loop with scripted key batches; a C{"window
        resize"} batch first changes the screen's size to C{resizeTo}, as a terminal
        does.
        """
        from twisted.internet.testing import MemoryReactorClock
        from urwid.testing import ScriptedScreen

        class ResizingScreen(ScriptedScreen):
            """
            A scripted screen whose size changes just before a C{"window resize"} batch.
            """
            def get_input(self, raw_keys: bool = False) -> Any:
                """
                The next batch; resize first if it is the resize key.
                """
                result = super().get_input(raw_keys)
                if resizeTo and "window resize" in (result[0] if raw_keys else result):
                    self.size = resizeTo
                return result

        self.reactor = MemoryReactorClock()
        self.state = initialState()
        self.endpoint = DaemonEndpoint(self.state)
        self.view = ConsoleView(lambda action: None, utf8=True, clock=self.reactor.seconds)
        self.screen = ResizingScreen(size=size, inputs=inputs)
        self.loop = app.buildLoop(self.view, self.reactor, screen=self.screen, manageReactor=False)
        self.exits: list[bool] = []
        self.controller = app.ConsoleController(
            self.view, self.endpoint, self.reactor, "ctl.sock", redraw=self.loop.draw_screen,
            exit=lambda: self.exits.append(True), jitter=lambda: 0.0)
        self.addCleanup(self.controller.stop)
        self.loop.start()
        self.addCleanup(self.loop.stop)
        self.controller.start()

    def spin(self, seconds: float = 1.0) -> None:
        """
        Move bytes and time in small steps.
        """
        for _ in range(int(seconds / 0.01)):
            self.endpoint.flush()
            self.reactor.advance(0.01)

    def test_keysReachTheDaemon(self) -> None:
        """
        p on the selected user, pressed in the running program, makes it VIP on the
        daemon; the screen shows the answer.
        """
        self.startLoop([["down"], ["p"], ["h", "d"]])
        self.spin(0.5)
        # The scripted batches wait for draws; keep drawing until they are used up.
        for _ in range(10):
            self.loop.draw_screen()
            self.spin(0.2)
        self.assertEqual(self.state["users"]["bob"]["priority"], "vip")
        self.assertTrue(self.state["backends"][0]["draining"])
        text = "\n".join(self.screen.last_text)
        self.assertRegex(text, r"◆● +bob +vip")
        self.assertRegex(text, r"◌ gpu1 +draining")

    def test_resize(self) -> None:
        """
        A window resize redraws the whole screen at the new size.
        """
        self.startLoop([["tab"], ["window resize"]], size=(80, 24), resizeTo=(100, 30))
        self.spin(0.5)
        self.assertEqual(len(self.screen.canvases[0].decoded_text), 24)
        self.assertEqual(len(self.screen.last_text), 30)
        self.assertEqual({len(line) for line in self.screen.last_text}, {100})
        self.assertIn("Users (2)", "\n".join(self.screen.last_text))

    def test_quit(self) -> None:
        """
        q leaves the console and sends the daemon nothing.
        """
        self.startLoop([["q"]])
        self.spin(0.5)
        self.loop.draw_screen()
        self.spin(0.2)
        self.assertEqual(self.exits, [True])
        received = [name for name, _ in self.endpoint.daemons[0].received]
        self.assertEqual(received[:2], ["Version", "Subscribe"])
        self.assertNotIn("SetUser", received)
