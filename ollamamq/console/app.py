# -*- test-case-name: tests.test_console_app -*-
"""
The console's controller: one AMP connection to the daemon's control socket (kept up by
L{ClientService}, with backoff, across daemon restarts), the state it mirrors from the
daemon's answers and pushed events, and the urwid C{MainLoop} it drives.

It owns no policy: every key that changes something becomes one control command
(L{ollamamq.control.amp}), and what the daemon answers (or refuses) is shown in the status
line. Updates come from pushed events: each event does a bounded amount of work (patch one
entry, mark a listing stale); stale listings are fetched again at most every
L{REFRESH_INTERVAL}, and the screen is redrawn at most every L{DRAW_INTERVAL}.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import urwid
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from ollamamq.control import amp as commands
from ollamamq.console.widgets import PALETTE, Action, ConsoleView

# Pushed events mark listings stale; they are fetched again at most this often (seconds).
REFRESH_INTERVAL = 0.5

# While requests come and go, users and backends are read again this often (seconds);
# in between, request events are counted into them.
RESYNC_INTERVAL = 10.0

# The screen is redrawn at most this often (seconds) for pushed updates.
DRAW_INTERVAL = 0.25

# The header's rates and the queue waits advance this often (seconds).
TICK_INTERVAL = 1.0

# Request rates are averaged over this many ticks.
RATE_WINDOW = 5

# At most this many rows of each listing are fetched (the totals are still shown).
MAX_USERS = 2000
# The queue is shown from its first rows (what fits a screen, with room to scroll): it is
# the listing re-read after request events, so it is kept short.
MAX_QUEUE = 50
MAX_BLOCKED = 2000

# Reconnection backoff: the delay after the n-th failed attempt is RETRY_INITIAL * 2**n
# seconds (0.5, 1, 2, ...), at most RETRY_MAX.
RETRY_INITIAL = 0.25
RETRY_MAX = 10.0

DEFAULT_CONTROL = "ollamamq.sock"

# The longest path a UNIX socket address can hold on Linux (sun_path is 108 bytes,
# NUL-terminated); a longer one fails inside Twisted with an unhelpful error.
MAX_SOCKET_PATH = 107


def explainConnectFailure(failure: Failure, path: str) -> str:
    """
    What to tell the operator when the control socket at C{path} cannot be reached.
    """
    value = failure.value
    code = getattr(value, "osError", None)
    if code is None and isinstance(value, OSError):
        code = value.errno
    if code in (errno.EACCES, errno.EPERM):
        return f"Permission denied on {path}: run the console as the daemon's user or root."
    if code == errno.ENOENT:
        return f"No daemon: {path} does not exist."
    if isinstance(value, netError.ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return f"No daemon answers on {path} (stale socket)."
    return f"Cannot connect to {path}: {value}"


class ConsoleProtocol(amp.AMP):
    """
    The console's end of the control connection: takes the daemon's L{commands.Event}s
    and tells the controller when the connection ends.
    """

    def __init__(self, controller: ConsoleController) -> None:
        super().__init__()
        self.controller = controller

    @commands.Event.responder
    def event(self, name: str, payload: str) -> dict:
        """
        Hand one pushed event to the controller; answering at once lets the daemon send
        the next.
        """
        self.controller.eventReceived(name, payload)
        return {}

    def connectionLost(self, reason: Failure) -> None:
        """
        Tell the controller, then let AMP fail the commands still waiting for answers.
        """
        self.controller.connectionLost(self, reason)
        super().connectionLost(reason)


class _ConsoleFactory(Factory):
    """
    Builds the L{ConsoleProtocol} of each (re)connection for one controller.
    """

    noisy = False

    def __init__(self, controller: ConsoleController) -> None:
        self.controller = controller

    def buildProtocol(self, addr: Any) -> ConsoleProtocol:
        """
        A protocol bound to the controller.
        """
        protocol = ConsoleProtocol(self.controller)
        protocol.factory = self
        return protocol


class ConsoleController:
    """
    Connects the view to the daemon.

    @param view: the screen; its C{onAction} is set to L{perform}.
    @param endpoint: the control socket's client endpoint.
    @param clock: schedules refreshes, redraws, ticks and reconnections.
    @param where: the socket as the operator knows it, for messages.
    @param redraw: draws the screen now (the MainLoop's C{draw_screen}).
    @param exit: leaves the console (raises C{urwid.ExitMainLoop} in the real program).
    @param jitter: added to each reconnection delay (tests pass C{lambda: 0}).
    """

    def __init__(self, view: ConsoleView, endpoint: IStreamClientEndpoint, clock: IReactorTime,
                 where: str, redraw: Callable[[], None] = lambda: None,
                 exit: Callable[[], None] = lambda: None,
                 jitter: Callable[[], float] | None = None) -> None:
        self.view = view
        view.onAction = self.perform
        self.clock = clock
        self.where = where
        self.redraw = redraw
        self.exit = exit
        self.protocol: ConsoleProtocol | None = None
        self.state: dict[str, Any] = {
            "backends": [], "users": [], "queue": [], "blocked_ips": [], "queued": 0, "active": 0,
        }
        self.peers: dict[str, str] = {}
        self.connectedAt: float | None = None
        self.retryDelay: float | None = None
        self._stale: set[str] = set()
        self._users: dict[str, dict] = {}
        self._requestEvents = 0
        self._lastResync = 0.0
        self._refreshCall: IDelayedCall | None = None
        self._refreshing = False
        self._drawCall: IDelayedCall | None = None
        self._lastDraw = -DRAW_INTERVAL
        self._finished = 0
        self._tokens: int | None = None
        self._daemonStarted: float | None = None
        self._samples: deque[tuple[int, int | None]] = deque(maxlen=RATE_WINDOW)
        self.history: deque[float] = deque(maxlen=120)
        self._stopped = False
        policy = backoffPolicy(RETRY_INITIAL, RETRY_MAX, 2.0, **({"jitter": jitter} if jitter else {}))

        def retry(attempt: int) -> float:
            # Remembered so the banner can say when the next attempt is.
            self.retryDelay = policy(attempt)
            return self.retryDelay

        factory = _ConsoleFactory(self)
        self.service = ClientService(endpoint, factory, retryPolicy=retry, clock=clock)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock

    # --- connection ---

    def start(self) -> None:
        """
        Start connecting (and keep reconnecting) to the daemon.
        """
        self.view.showConnection(f"Connecting to {self.where}...")
        # Waiting first, so even a first attempt that fails at once is reported.
        self._waitForConnection()
        self.service.startService()
        self._ticker.start(TICK_INTERVAL, now=False)

    def stop(self) -> Deferred[None]:
        """
        Disconnect and stop every timer.
        """
        self._stopped = True
        for call in (self._refreshCall, self._drawCall):
            if call is not None and call.active():
                call.cancel()
        self._refreshCall = self._drawCall = None
        if self._ticker.running:
            self._ticker.stop()
        return self.service.stopService()

    def _waitForConnection(self) -> None:
        """
        Be told of the next connection, or of the next failed attempt.
        """
        d = self.service.whenConnected(failAfterFailures=1)
        d.addCallbacks(self._connected, self._connectFailed)

    def _connectFailed(self, failure: Failure) -> None:
        """
        Say why the socket could not be reached, and when the next attempt is.
        """
        if failure.check(CancelledError) or self._stopped:
            return
        message = explainConnectFailure(failure, self.where)
        if self.retryDelay is not None:
            message += f" Retrying in {self.retryDelay:.1f}s."
        self.view.showConnection(message)
        self.requestDraw()
        # Not from inside ClientService's own callback: it refuses re-entrant calls.
        self.clock.callLater(0, self._waitAgain)

    def _waitAgain(self) -> None:
        """
        Wait for the next connection again, unless stopped meanwhile.
        """
        if not self._stopped:
            self._waitForConnection()

    def _connected(self, protocol: ConsoleProtocol) -> None:
        """
        Attached: clear the banner and read the daemon's state.
        """
        self.protocol = protocol
        self.connectedAt = self.clock.seconds()
        self.retryDelay = None
        self.view.showConnection(None)
        self.view.showStatus(f"Attached to {self.where}.")
        d = ensureDeferred(self._attach(protocol))
        d.addErrback(self._attachFailed, protocol)

    async def _attach(self, protocol: ConsoleProtocol) -> None:
        """
        Ask the version, subscribe to events, then read everything once.
        """
        version = await protocol.callRemote(commands.Version)
        self.state["version"] = version["daemon"]
        if version["protocol"] != commands.PROTOCOL_VERSION:
            self.view.showStatus(
                f"The daemon speaks control protocol {version['protocol']}, this console "
                f"{commands.PROTOCOL_VERSION}: some actions may fail.", error=True)
        await protocol.callRemote(commands.Subscribe)
        self._stale |= {"snapshot", "users", "queue", "blocked"}
        await self._refresh(protocol)

    def _attachFailed(self, failure: Failure, protocol: ConsoleProtocol) -> None:
        """
        Show why the daemon's state could not be read (on this connection).
        """
        if protocol is not self.protocol:
            return  # the connection went away meanwhile; connectionLost said so
        self.view.showStatus(f"Could not read the daemon's state: {failure.value}", error=True)
        self.requestDraw()

    def connectionLost(self, protocol: ConsoleProtocol, reason: Failure) -> None:
        """
        The daemon went away (stopped, restarted): say so and wait for it to come back.
        """
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.connectedAt = None
        if self._stopped:
            return
        self.view.showConnection(f"The daemon went away ({self.where}): reconnecting...")
        self.requestDraw()
        self.clock.callLater(0, self._waitAgain)

    # --- the mirrored state ---

    def eventReceived(self, name: str, payload: str) -> None:
        """
        Apply one pushed event: bounded work, the rest is left to the next refresh.
        """
        try:
            data = json.loads(payload)
        except ValueError:
            data = {"raw": payload}
        if not isinstance(data, dict):
            data = {"value": data}
        if name == "totals":
            self.state["queued"] = data.get("queued", self.state["queued"])
            self.state["active"] = data.get("active", self.state["active"])
        else:
            self.view.showEvent(dict(data, type=name), time.time())
        if name == "request.accounted":
            tokens = _tokenCount(data)
            if tokens is not None:
                self._tokens = (self._tokens or 0) + tokens
        elif name.startswith("request."):
            self._requestEvent(name, data)
        elif name == "backend.changed":
            self._patchBackend(data)
        elif name == "policy.changed":
            if isinstance(data.get("user"), dict):
                self._patchUser(data["user"])
            elif "address" in data:
                self._patchAddress(str(data["address"]), bool(data.get("blocked")))
        elif name in ("config.reloaded", "events.dropped"):
            self._stale |= {"snapshot", "users", "queue", "blocked"}
        self._scheduleRefresh()
        self.requestDraw()

    def _requestEvent(self, name: str, data: dict) -> None:
        """
        Count a request event into the user's and the backend's entries (so a busy
        daemon is not asked for its whole user list on every request), and mark the
        queue's first page stale. A user not known yet makes the users be read again;
        whatever drifts is corrected by the periodic resynchronisation.
        """
        self._requestEvents += 1
        user = str(data.get("user"))
        entry = self._users.get(user)
        if entry is None:
            self._stale.add("users")
        if name == "request.queued":
            if data.get("peer"):
                self.peers[user] = str(data["peer"])
            if entry is not None and isinstance(data.get("queued"), int):
                entry["queued"] = data["queued"]
            self._stale.add("queue")
            return
        if name in ("request.started", "request.cancelled"):
            # It left the queue: drop its row now, the next page read fills up.
            ident = data.get("id")
            queue = [q for q in self.state["queue"] if q.get("id") != ident]
            if len(queue) < len(self.state["queue"]) and self.state.get("queue_total"):
                self.state["queue_total"] -= 1
            self.state["queue"] = queue
            self._stale.add("queue")
            if entry is not None:
                entry["queued"] = max(0, entry.get("queued", 0) - 1)
        if name == "request.started":
            if entry is not None:
                entry["active"] = entry.get("active", 0) + 1
                entry["served"] = entry.get("served", 0) + 1
            self._countOnBackend(data.get("backend"), 1)
        elif name == "request.finished":
            if entry is not None:
                entry["active"] = max(0, entry.get("active", 0) - 1)
            self._countOnBackend(data.get("backend"), -1)
            self._finished += 1
            tokens = _tokenCount(data)
            if tokens is not None:
                self._tokens = (self._tokens or 0) + tokens

    def _countOnBackend(self, name: Any, delta: int) -> None:
        """
        Move a backend's active count by C{delta}.
        """
        for backend in self.state["backends"]:
            if backend.get("name") == name:
                backend["active"] = max(0, backend.get("active", 0) + delta)
                return

    def _patchBackend(self, entry: dict) -> None:
        """
        Replace (or insert, or remove) one backend entry from an event or answer.
        """
        backends = [b for b in self.state["backends"] if b.get("name") != entry.get("name")]
        if not entry.get("removed"):
            old = {b.get("name"): i for i, b in enumerate(self.state["backends"])}
            backends.insert(min(old.get(entry.get("name"), len(backends)), len(backends)), entry)
        self.state["backends"] = backends

    def _patchUser(self, entry: dict) -> None:
        """
        Replace (or add) one user entry from an event or answer.
        """
        ident = str(entry.get("id"))
        user = self._users.get(ident)
        if user is not None:
            user.update(entry)
            return
        self._users[ident] = user = dict(entry)
        self.state["users"].append(user)
        self.state["users"].sort(key=lambda u: str(u.get("id")))

    def _patchAddress(self, address: str, blocked: bool) -> None:
        """
        Add or remove one blocked address.
        """
        ips = [a for a in self.state["blocked_ips"] if a != address]
        if blocked:
            ips.append(address)
        self.state["blocked_ips"] = ips

    def _scheduleRefresh(self) -> None:
        """
        Read the stale listings again in L{REFRESH_INTERVAL}, unless already due.
        """
        if not self._stale or self._refreshCall is not None or self._refreshing:
            return
        if self.protocol is None or self._stopped:
            return
        self._refreshCall = self.clock.callLater(REFRESH_INTERVAL, self._refreshNow)

    def _refreshNow(self) -> None:
        """
        The refresh timer fired: read the stale listings on the current connection.
        """
        self._refreshCall = None
        protocol = self.protocol
        if protocol is None:
            return
        d = ensureDeferred(self._refresh(protocol))
        d.addErrback(self._attachFailed, protocol)

    async def _refresh(self, protocol: ConsoleProtocol) -> None:
        """
        Fetch the stale listings again (only those), then draw.
        """
        self._refreshing = True
        try:
            stale, self._stale = self._stale, set()
            if "snapshot" in stale:
                snap = await protocol.callRemote(commands.Snapshot)
                self.state["backends"] = [dict(b) for b in snap["backends"]]
                self.state["queued"], self.state["active"] = snap["queued"], snap["active"]
                # When the daemon started, on our clock: the header's uptime runs on.
                self._daemonStarted = self.clock.seconds() - snap["uptime"]
            if "users" in stale:
                rows, total = await _pages(protocol, commands.ListUsers, "users", MAX_USERS)
                self.state["users"] = [dict(u) for u in rows]
                self._users = {u["id"]: u for u in self.state["users"]}
                self.state["users_total"] = total
                self._lastResync = self.clock.seconds()
                known = {u["id"] for u in rows}
                self.peers = {k: v for k, v in self.peers.items() if k in known}
            if "queue" in stale:
                rows, total = await _pages(protocol, commands.ListQueue, "requests", MAX_QUEUE)
                self.state["queue"] = [dict(q) for q in rows]
                self.state["queue_total"] = total
                for q in rows:
                    if q.get("peer"):
                        self.peers[q["user"]] = q["peer"]
            if "blocked" in stale:
                rows, _ = await _pages(protocol, commands.ListBlocked, "addresses", MAX_BLOCKED)
                self.state["blocked_ips"] = [a["address"] for a in rows]
        finally:
            self._refreshing = False
        self.requestDraw()
        # Events that came in meanwhile: one more round, still at most every interval.
        self._scheduleRefresh()

    def viewState(self) -> dict:
        """
        The mirrored state in the view's snapshot shape: users carry the wait of their
        oldest listed request and the last address they were seen from.
        """
        oldest: dict[str, float] = {}
        for q in self.state["queue"]:
            oldest[q["user"]] = max(oldest.get(q["user"], 0.0), q.get("waited") or 0.0)
        users = []
        for user in self.state["users"]:
            extra: dict[str, Any] = {}
            if user.get("id") in oldest:
                extra["oldest_wait"] = oldest[user["id"]]
            if user.get("id") in self.peers and not user.get("ip"):
                extra["ip"] = self.peers[user["id"]]
            users.append(dict(user, **extra) if extra else user)
        snapshot = dict(self.state, users=users)
        if self._daemonStarted is not None:
            snapshot["uptime"] = self.clock.seconds() - self._daemonStarted
        elif self.connectedAt is not None:
            snapshot["attached"] = self.clock.seconds() - self.connectedAt
        return snapshot

    # --- drawing ---

    def requestDraw(self) -> None:
        """
        Redraw soon, but at most every L{DRAW_INTERVAL}.
        """
        if self._drawCall is not None or self._stopped:
            return
        delay = max(0.0, self._lastDraw + DRAW_INTERVAL - self.clock.seconds())
        self._drawCall = self.clock.callLater(delay, self._draw)

    def _draw(self) -> None:
        """
        Give the view the mirrored state and draw the screen.
        """
        self._drawCall = None
        self._lastDraw = self.clock.seconds()
        self.view.showSnapshot(self.viewState())
        self.redraw()

    def _tick(self) -> None:
        """
        Once a second: sample the rates, advance the history, redraw; and while
        requests come and go, read users and backends again every L{RESYNC_INTERVAL}
        to correct what counting events cannot know (a retried request, a user's
        configured policy).
        """
        if self._requestEvents and self.clock.seconds() - self._lastResync >= RESYNC_INTERVAL:
            self._requestEvents = 0
            self._lastResync = self.clock.seconds()
            self._stale |= {"snapshot", "users"}
            self._scheduleRefresh()
        self._samples.append((self._finished, self._tokens))
        self._finished = 0
        self._tokens = None
        requestRate = sum(s[0] for s in self._samples) / len(self._samples)
        counted = [s[1] for s in self._samples if s[1] is not None]
        tokenRate = sum(counted) / len(self._samples) if counted else None
        self.history.append(float(self._samples[-1][0]))
        self.view.showRates(requestRate, tokenRate, list(self.history))
        self.requestDraw()

    # --- actions ---

    def perform(self, action: Action) -> Deferred[None] | None:
        """
        Carry out an operator action: send its command and put the answer (or the
        daemon's error) in the status line.
        """
        if action.name == "quit":
            self.stop()
            self.exit()
            return None
        protocol = self.protocol
        if protocol is None:
            self.view.showStatus(f"{action.label}: not connected to the daemon.", error=True)
            self.requestDraw()
            return None
        try:
            command, args, done = self._command(action)
        except KeyError:
            self.view.showStatus(f"Unknown action {action.name}.", error=True)
            return None
        d = protocol.callRemote(command, **args)
        # Attached before the answer can arrive: AMP drops the connection on an error
        # answer nobody handles.
        d.addCallbacks(lambda answer: self._succeeded(action, answer, done),
                       lambda failure: self._failed(action, failure))
        return d

    def _command(self, action: Action) -> tuple[type[amp.Command], dict, Callable[[dict], str]]:
        """
        The command, its arguments, and the function that turns the daemon's answer
        into the status line (patching the mirrored state), for C{action}.
        """
        a = action.args

        def user(answer: dict) -> str:
            self._patchUser(dict(answer))
            parts = [f"priority {answer['priority']}", f"weight {answer['weight']:g}"]
            if answer.get("blocked"):
                parts.append("blocked")
            return f"{answer['id']}: " + ", ".join(parts)

        def backend(answer: dict) -> str:
            self._patchBackend(dict(answer))
            return f"{answer['name']}: " + ("draining" if answer.get("draining") else "taking requests")

        def address(blocked: bool) -> Callable[[dict], str]:
            def done(answer: dict) -> str:
                self._patchAddress(answer["address"], blocked)
                return f"{answer['address']} " + ("blocked" if blocked else "unblocked")
            return done

        def cancelled(answer: dict) -> str:
            self.state["queue"] = [q for q in self.state["queue"] if q.get("id") != answer["id"]]
            self._stale.add("queue")
            return f"request {answer['id']} cancelled"

        def reloaded(answer: dict) -> str:
            self._stale |= {"snapshot", "users", "queue", "blocked"}
            changes = answer["changes"]
            return "config reloaded: " + ("; ".join(changes) if changes else "no changes")

        return {
            "priority": lambda: (commands.SetUser, {"user": a["user"], "priority": a["priority"]}, user),
            "weight": lambda: (commands.SetUser, {"user": a["user"], "weight": float(a["weight"])}, user),
            "block": lambda: (commands.SetUser, {"user": a["user"], "blocked": True}, user),
            "unblock": lambda: (commands.SetUser, {"user": a["user"], "blocked": False}, user),
            "blockIP": lambda: (commands.BlockAddress, {"address": a["ip"]}, address(True)),
            "unblockIP": lambda: (commands.UnblockAddress, {"address": a["ip"]}, address(False)),
            "drain": lambda: (commands.DrainBackend, {"name": a["backend"]}, backend),
            "undrain": lambda: (commands.UndrainBackend, {"name": a["backend"]}, backend),
            "cancel": lambda: (commands.CancelRequest, {"id": str(a["request"])}, cancelled),
            "reload": lambda: (commands.Reload, {}, reloaded),
        }[action.name]()

    def _succeeded(self, action: Action, answer: dict, done: Callable[[dict], str]) -> None:
        """
        Show what the daemon answered.
        """
        self.view.showStatus(done(answer))
        self._scheduleRefresh()
        self.requestDraw()

    def _failed(self, action: Action, failure: Failure) -> None:
        """
        Show why the daemon refused (or could not be asked).
        """
        if failure.check(commands.ControlError):
            reason = str(failure.value)
        elif failure.check(amp.UnknownRemoteError):
            reason = "the daemon failed to do it (see its log)"
        elif failure.check(amp.UnhandledCommand):
            reason = "this daemon does not support it"
        elif failure.check(netError.ConnectionDone, netError.ConnectionLost):
            reason = "the connection to the daemon was lost"
        else:
            reason = str(failure.value) or failure.type.__name__
        self.view.showStatus(f"{action.label or action.name} failed: {reason}", error=True)
        self.requestDraw()


def _tokenCount(payload: dict) -> int | None:
    """
    The tokens a finished request produced, when the daemon reports them
    (C{"tokens": {"prompt", "completion"}} or C{"completion_tokens"}).
    """
    tokens = payload.get("tokens")
    if isinstance(tokens, dict):
        value = tokens.get("completion")
        return value if isinstance(value, int) else None
    if isinstance(tokens, int):
        return tokens
    value = payload.get("completion_tokens")
    return value if isinstance(value, int) else None


async def _pages(protocol: amp.AMP, command: type[amp.Command], key: str,
                 maxRows: int) -> tuple[list[dict], int]:
    """
    Fetch a paged listing up to C{maxRows} rows; return the rows and the total.
    """
    rows: list[dict] = []
    offset: int | None = 0
    total = 0
    while offset is not None and len(rows) < maxRows:
        answer = await protocol.callRemote(command, offset=offset,
                                           limit=min(commands.PAGE_LIMIT, maxRows - len(rows)))
        rows += answer[key]
        total = answer["total"]
        offset = answer["next"]
    return rows, total


class Options(usage.Options):
    """
    C{ollamamq-console} options.
    """

    synopsis = "Usage: ollamamq-console [--control PATH]"
    longdesc = ("Attach to a running ollamamq daemon over its control socket: watch backends, "
                "users and the queue, and act on them. q or Esc quits the console, never the daemon.")
    optParameters = [
        ["control", "c", None,
         f"The daemon's control socket [default: $OLLAMAMQ_CONTROL or {DEFAULT_CONTROL}]."],
        ["log", None, None, "Append the console's own log (its errors) to this file "
         "[default: no log, so nothing is written over the screen]."],
    ]

    def postOptions(self) -> None:
        """
        Default the socket from the environment; refuse a path no UNIX socket can have.
        """
        if self["control"] is None:
            self["control"] = os.environ.get("OLLAMAMQ_CONTROL") or DEFAULT_CONTROL
        if len(os.fsencode(self["control"])) > MAX_SOCKET_PATH:
            raise usage.UsageError(
                f"--control {self['control']!r}: a UNIX socket path has at most "
                f"{MAX_SOCKET_PATH} bytes; use a shorter path (or a symbolic link to its directory)")


def _quit() -> None:
    """
    Leave the MainLoop (and, as it manages the reactor, the program).
    """
    raise urwid.ExitMainLoop()


def buildLoop(view: ConsoleView, reactor: Any, screen: Any = None,
              manageReactor: bool = True) -> urwid.MainLoop:
    """
    The MainLoop on the Twisted reactor for C{view}.
    """
    return urwid.MainLoop(
        view, PALETTE, screen=screen, handle_mouse=False,
        event_loop=urwid.TwistedEventLoop(reactor=reactor, manage_reactor=manageReactor),
    )


def main(argv: list[str] | None = None) -> int:
    """
    The C{ollamamq-console} program.
    """
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"ollamamq-console: {e}\n{options}", file=sys.stderr)
        return 2
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # Nothing may be printed over the screen: the log goes to --log, or nowhere.
    observers = [textFileLogObserver(open(options["log"], "a"))] if options["log"] else []
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)

    path = options["control"]
    endpoint = clientFromString(reactor, "unix:path=" + quoteStringArgument(path))
    from urwid.display.raw import Screen

    view = ConsoleView(lambda action: None)
    loop = buildLoop(view, reactor, screen=Screen())
    controller = ConsoleController(view, endpoint, reactor, path,
                                   redraw=loop.draw_screen, exit=_quit)
    reactor.callWhenRunning(controller.start)
    loop.run()
    return 0
