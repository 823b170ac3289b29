# -*- test-case-name: tests.test_control_server -*-
"""
The control socket: AMP responders for L{ollamamq.control.amp} on the operator actions,
and the UNIX-socket service that serves them.

Every responder translates arguments and results only; the work is in
L{ollamamq.control.actions}. A responder that fails in a way its command does not
declare (a bug) answers L{InternalError} and logs the traceback; the connection stays
up (plain AMP would drop it).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import CannotListenError, ConnectionClosed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from ollamamq import __version__
from ollamamq.control import amp as commands
from ollamamq.control.actions import ControlActions, checkedNames
from ollamamq.control.amp import PAGE_LIMIT, PROTOCOL_VERSION, InternalError, InvalidValue
from ollamamq.control.events import EventHub
from ollamamq.keys import UnknownKey, canHoldKeys

log = Logger()

MAX_IN_FLIGHT = 64
"""
The most L{commands.Event}s sent to one subscriber and not yet answered. Beyond it the
subscriber's events are counted, not sent or kept, and announced with one
C{events.dropped} once it catches up: its memory cost in the daemon is bounded by this.
"""

MAX_VALUE = 60000
"""
The most bytes of one encoded AMP value the daemon sends (AMP's limit is 65535): pages
are cut shorter to stay below it.
"""


def _backendRow(entry: dict) -> dict:
    """
    A backend's status entry as an AMP L{commands.BACKEND_ROW}.
    """
    return {
        "name": entry["name"],
        "url": entry["url"],
        "state": entry["state"],
        "online": entry["online"],
        "kind": entry["kind"],
        "slots": entry["slots"],
        "active": entry["active"],
        "draining": entry["draining"],
        "models": list(entry["models"]),
        "loaded": list(entry["loaded"]),
        "error": entry["error"],
        "source": entry["source"],
    }


def _userRow(entry: dict) -> dict:
    """
    A user's entry as an AMP L{commands.USER_ROW}.
    """
    return {
        "id": entry["id"],
        "priority": entry["priority"],
        "weight": float(entry["weight"]),
        "maxQueued": entry["max_queued"],
        "blocked": entry["blocked"],
        "queued": entry["queued"],
        "active": entry["active"],
        "served": entry["served"],
        "runtime": list(entry["runtime"]),
    }


def _queueRow(entry: dict) -> dict:
    """
    A queued request as an AMP L{commands.QUEUE_ROW}.
    """
    return {
        "id": entry["id"],
        "position": entry["position"],
        "user": entry["user"],
        "model": entry["model"],
        "waited": float(entry["waited"]),
        "peer": entry["peer"],
    }


class ControlProtocol(amp.AMP):
    """
    One control connection: the responders, and this connection's event subscription.
    """

    def __init__(self, actions: ControlActions, hub: EventHub, keys: Any = None) -> None:
        """
        @param keys: the runtime-minted keys (L{ollamamq.keys.MintedKeys}), or L{None}
            without a state store.
        """
        super().__init__()
        self._actions = actions
        self._hub = hub
        self._keys = keys
        self._names: list[str] | None = None
        self._subscribed = False
        self._inFlight = 0
        self._dropped = 0
        self._closed = False

    # --- keeping the connection up whatever a responder does ---

    def lookupFunction(self, name: bytes) -> Any:
        """
        Wrap every responder so that an undeclared failure (a bug, or a result AMP cannot
        encode) answers L{InternalError} instead of closing the connection.
        """
        function = super().lookupFunction(name)
        if function is None:
            return None

        def guarded(box: Any) -> Deferred:
            d = maybeDeferred(function, box)
            d.addErrback(self._internalError, name)
            return d

        return guarded

    def _internalError(self, failure: Failure, name: bytes) -> Failure:
        """
        Pass declared errors on; turn anything else into L{InternalError}.
        """
        if failure.check(amp.RemoteAmpError):
            return failure
        log.failure("Control command {name} failed", failure, name=name.decode("ascii", "replace"))
        return Failure(
            amp.RemoteAmpError(InternalError.code, f"internal error in {name.decode('ascii', 'replace')}: see the daemon's log")
        )

    # --- reading ---

    @commands.Version.responder
    def version(self) -> dict:
        return {"protocol": PROTOCOL_VERSION, "daemon": __version__}

    @commands.Snapshot.responder
    def snapshot(self) -> dict:
        snap = self._actions.snapshot()
        return {
            "queued": snap["queued"],
            "active": snap["active"],
            "users": snap["users"],
            "blocked": snap["blocked"],
            "backends": [_backendRow(b) for b in snap["backends"]],
            "uptime": snap["uptime"],
        }

    @staticmethod
    def _window(offset: int | None, limit: int | None) -> tuple[int, int]:
        """
        A page's offset and row limit, defaulted and checked.

        @raise InvalidValue: for a negative offset or a limit below 1.
        """
        offset = 0 if offset is None else offset
        limit = PAGE_LIMIT if limit is None else limit
        if offset < 0:
            raise InvalidValue(f"offset: expected 0 or more, got {offset}")
        if limit < 1:
            raise InvalidValue(f"limit: expected 1 or more, got {limit}")
        return offset, min(limit, PAGE_LIMIT)

    def _page(
        self,
        rows: list[dict],
        key: str,
        spec: list,
        offset: int | None,
        limit: int | None,
        total: int | None = None,
    ) -> dict:
        """
        One page of C{rows} (all rows, or the first ones when C{total} says how many
        there are) under C{key}, cut to fit in one AMP value.

        @raise InvalidValue: for a negative offset or a limit below 1.
        """
        offset, limit = self._window(offset, limit)
        total = len(rows) if total is None else total
        page = rows[offset : offset + limit]
        encoder = amp.AmpList(spec)
        while len(page) > 1 and len(encoder.toStringProto(page, self)) > MAX_VALUE:
            page = page[: len(page) // 2]
        end = offset + len(page)
        return {key: page, "total": total, "next": end if end < total else None}

    @commands.ListUsers.responder
    def listUsers(self, offset: int | None = None, limit: int | None = None) -> dict:
        rows = [_userRow(u) for u in self._actions.users()]
        return self._page(rows, "users", commands.USER_ROW, offset, limit)

    @commands.ListQueue.responder
    def listQueue(
        self, offset: int | None = None, limit: int | None = None, user: str | None = None
    ) -> dict:
        start, count = self._window(offset, limit)
        # Only the rows up to the end of the page are worked out (see queuedRequests).
        rows = [_queueRow(r) for r in self._actions.queue(user, limit=start + count)]
        total = self._actions.queuedCount(user)
        return self._page(rows, "requests", commands.QUEUE_ROW, offset, limit, total)

    @commands.ListBlocked.responder
    def listBlocked(self, offset: int | None = None, limit: int | None = None) -> dict:
        return self._page(
            self._actions.blocked(), "addresses", commands.ADDRESS_ROW, offset, limit
        )

    # --- users and addresses ---

    @commands.SetUser.responder
    def setUser(
        self,
        user: str,
        priority: str | None = None,
        weight: float | None = None,
        maxQueued: int | None = None,
        blocked: bool | None = None,
    ) -> Deferred[dict]:
        fields: dict[str, Any] = {}
        for name, value in (
            ("priority", priority),
            ("weight", weight),
            ("maxQueued", maxQueued),
            ("blocked", blocked),
        ):
            if value is not None:
                fields[name] = value
        return self._actions.setUser(user, **fields).addCallback(_userRow)

    @commands.ClearUser.responder
    def clearUser(self, user: str) -> Deferred[dict]:
        return self._actions.clearUser(user).addCallback(_userRow)

    @commands.BlockAddress.responder
    def blockAddress(self, address: str) -> Deferred[dict]:
        return self._actions.blockAddress(address)

    @commands.UnblockAddress.responder
    def unblockAddress(self, address: str) -> Deferred[dict]:
        return self._actions.unblockAddress(address).addCallback(
            lambda text: {"address": text}
        )

    # --- backends ---

    @commands.AddBackend.responder
    def addBackend(
        self, url: str, name: str | None = None, slots: int | None = None
    ) -> Deferred[dict]:
        return self._actions.addBackend(url, name, slots).addCallback(_backendRow)

    @commands.RemoveBackend.responder
    def removeBackend(self, name: str) -> Deferred[dict]:
        return self._actions.removeBackend(name).addCallback(lambda n: {"name": n})

    @commands.DrainBackend.responder
    def drainBackend(self, name: str) -> Deferred[dict]:
        return self._actions.drainBackend(name, True).addCallback(_backendRow)

    @commands.UndrainBackend.responder
    def undrainBackend(self, name: str) -> Deferred[dict]:
        return self._actions.drainBackend(name, False).addCallback(_backendRow)

    @commands.SetSlots.responder
    def setSlots(self, name: str, slots: int) -> Deferred[dict]:
        return self._actions.setSlots(name, slots).addCallback(_backendRow)

    # --- requests, reload ---

    @commands.CancelRequest.responder
    def cancelRequest(self, id: str) -> dict:
        return {"id": self._actions.cancelRequest(id)}

    def _keysFor(self, user: str) -> Any:
        """
        The minted-keys manager for a user id a key can name.
        """
        if not canHoldKeys(user):
            raise commands.InvalidValue(f"user: not a user id a key can name: {user!r}")
        if self._keys is None:
            raise commands.InvalidValue("keys: no state store to keep minted keys in")
        return self._keys

    @commands.MintKey.responder
    def mintKey(self, user: str) -> Deferred[dict]:
        keys = self._keysFor(user)

        async def mint() -> dict:
            minted = await keys.mint(user)
            return {"user": user, "prefix": minted.prefix, "key": minted.key}

        return ensureDeferred(mint())

    @commands.ListKeys.responder
    def listKeys(self, user: str) -> Deferred[dict]:
        d = self._keysFor(user).list(user)
        return d.addCallback(lambda found: {
            "keys": [{"prefix": k.prefix, "created": k.created} for k in found]})

    @commands.RevokeKey.responder
    def revokeKey(self, user: str, prefix: str) -> Deferred[dict]:
        keys = self._keysFor(user)

        async def revoke() -> dict:
            try:
                await keys.revoke(user, prefix)
            except UnknownKey:
                raise commands.UnknownKey(f"user {user!r} has no key {prefix!r}") from None
            return {"user": user, "prefix": prefix}

        return ensureDeferred(revoke())

    @commands.Reload.responder
    def reload(self) -> dict:
        return {"changes": self._actions.reload()}

    # --- events ---

    @commands.Subscribe.responder
    def subscribe(self, names: list[str] | None = None) -> dict:
        self._names = None if names is None else checkedNames(names)
        self._subscribed = True
        self._hub.subscribe(self)
        return {"subscribed": True}

    @commands.Unsubscribe.responder
    def unsubscribe(self) -> dict:
        self._subscribed = False
        self._hub.unsubscribe(self)
        return {"subscribed": False}

    def _wanted(self, name: str) -> bool:
        """
        Whether the subscription's filter selects C{name}.
        """
        if self._names is None:
            return True
        return any(name == n or name.startswith(n + ".") for n in self._names)

    def event(self, name: str, payload: dict) -> None:
        """
        Send one event, unless too many are unanswered (then count it as dropped).
        """
        if not self._subscribed or self._closed or not self._wanted(name):
            return
        if self._inFlight >= MAX_IN_FLIGHT:
            self._dropped += 1
            return
        self._send(name, json.dumps(payload, separators=(",", ":")))

    def _send(self, name: str, text: str) -> None:
        """
        Send an encoded event and count it until answered.
        """
        if len(text.encode("utf-8")) > MAX_VALUE:
            # Too big for one AMP value (a backend listing thousands of models): the
            # subscriber learns it missed one and reads the state with the listings.
            self._dropped += 1
            return
        self._inFlight += 1
        d = self.callRemote(commands.Event, name=name, payload=text)
        d.addBoth(self._answered)

    def _answered(self, result: Any) -> None:
        """
        One event was answered (or failed): maybe announce what was dropped meanwhile.
        """
        self._inFlight -= 1
        if isinstance(result, Failure) and not result.check(ConnectionClosed, amp.ProtocolSwitched):
            if not self._closed:
                log.warn("Subscriber failed an event: {error}", error=result.getErrorMessage())
        if self._dropped and not self._closed and self._inFlight <= MAX_IN_FLIGHT // 2:
            count, self._dropped = self._dropped, 0
            self._send("events.dropped", json.dumps({"count": count}))

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True
        self._hub.unsubscribe(self)
        super().connectionLost(reason)


class ControlFactory(Factory):
    """
    Makes a L{ControlProtocol} per connection.
    """

    noisy = False

    def __init__(self, actions: ControlActions, hub: EventHub, keys: Any = None) -> None:
        self.actions = actions
        self.hub = hub
        self.keys = keys

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        protocol = ControlProtocol(self.actions, self.hub, self.keys)
        protocol.factory = self
        return protocol


@implementer(IStreamServerEndpoint)
class PrivateUNIXEndpoint:
    """
    A UNIX socket only its owner can use: created with mode 0600 from the start (the
    umask is narrowed while it is bound, so there is no moment it is open to others),
    with a lockfile (C{PATH.lock}): a socket left by a crashed daemon is replaced, one
    held by a live daemon makes listening fail.
    """

    def __init__(self, reactor: Any, path: str) -> None:
        self._endpoint = endpoints.UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
        self.path = path

    def listen(self, factory: Any) -> Deferred:
        old = os.umask(0o177)
        try:
            # UNIXServerEndpoint binds synchronously, inside this call.
            return self._endpoint.listen(factory)
        finally:
            os.umask(old)


class _ControlListener(StreamServerEndpointService):
    """
    Listens on the control socket when the daemon starts; a socket another live daemon
    holds (or any other failure to listen) stops startup with one clear line.
    """

    def __init__(self, endpoint: PrivateUNIXEndpoint, factory: ControlFactory) -> None:
        super().__init__(endpoint, factory)
        self._path = endpoint.path
        # As for the HTTP ports: fail startup loudly rather than run without control.
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            if e.socketError == "Cannot acquire lock":
                raise SystemExit(
                    f"ollamamq: control socket {self._path} belongs to another running "
                    "ollamamq; stop it first or give this one another --control path"
                ) from None
            raise SystemExit(
                f"ollamamq: cannot listen on control socket {self._path}: {e.socketError}"
            ) from None
        log.info("ollamamq control socket on {path}", path=self._path)


def controlService(reactor: Any, path: str, factory: ControlFactory) -> StreamServerEndpointService:
    """
    The service listening on the control socket C{path}; starting it fails at once (with
    L{SystemExit} and a message) when another live daemon holds the socket.
    """
    return _ControlListener(PrivateUNIXEndpoint(reactor, path), factory)
