# -*- test-case-name: tests.test_control_actions -*-
"""
The one implementation of every operator action; the AMP responders
(L{ollamamq.control.server}) and the admin HTTP routes (L{ollamamq.control.http}) only
translate arguments and errors.

Config and runtime
==================

The config file gives the defaults; a runtime change (through either front end) wins until
it is cleared, and is saved in the store so a restart keeps it:

  - users: priority, weight, C{max_queued}, blocked. L{ControlActions.clearUser} drops them
    all; C{max_queued=0} drops that one; C{blocked=False} lifts a runtime block.
  - address blocks (runtime only).
  - backends: added at runtime; configured ones removed, drained or resized at runtime. A
    runtime removal holds across restarts and reloads until the backend is added again.

Every action changes the live objects first (the scheduler and the pool, at once), then
returns a L{Deferred} that fires with the result once the change is saved, so a caller
that got an answer knows a restart keeps it.

Errors are the exceptions of L{ollamamq.control.amp} (L{InvalidValue} names the field).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ollamamq.backends import Backend, BackendPool
from ollamamq.config import (
    PRIORITIES,
    Config,
    ConfigError,
    IPNetwork,
    UserConfig,
    backendURL,
    defaultBackendName,
)
from ollamamq.control.amp import (
    DuplicateBackend,
    InvalidValue,
    ReloadFailed,
    UnknownAddress,
    UnknownBackend,
    UnknownRequest,
    UnknownUser,
)
from ollamamq.control.events import EventHub
from ollamamq.scheduler import Scheduler
from ollamamq.store import BackendOverride, State, UserOverride

log = Logger()

_MISSING: Any = object()

MAX_NAME = 128
"""
The longest user id or backend name the control plane accepts.
"""

RESTART_FIELDS = ("listen", "control", "state", "demo")
"""
Config fields a reload cannot apply to a running daemon.
"""

USER_FIELDS = ("priority", "weight", "maxQueued", "blocked")
"""
The user policy fields, as the C{runtime} lists of user rows name them.
"""


def _checkName(field: str, value: Any) -> str:
    """
    A user id or backend name: non-empty text without control characters or slashes.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"{field}: expected a non-empty string, got {value!r}")
    if len(value) > MAX_NAME:
        raise InvalidValue(f"{field}: longer than {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value) or "/" in value:
        raise InvalidValue(f"{field}: must not contain control characters or '/'")
    return value


def checkPriority(value: Any) -> str:
    """
    @raise InvalidValue: unless C{value} is one of L{PRIORITIES}.
    """
    if value not in PRIORITIES:
        raise InvalidValue(f"priority: expected one of {', '.join(PRIORITIES)}, got {value!r}")
    return value


def checkWeight(value: Any) -> float:
    """
    @raise InvalidValue: unless C{value} is a finite positive number.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidValue(f"weight: expected a positive number, got {value!r}")
    return float(value)


def _checkCount(field: str, value: Any, least: int) -> int:
    """
    An integer of at least C{least}.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidValue(f"{field}: expected an integer of at least {least}, got {value!r}")
    return value


def parseNetwork(text: Any) -> IPNetwork:
    """
    An address (C{10.1.2.3}, C{::1}) or CIDR range (C{10.1.0.0/16}); host bits are
    dropped (C{10.1.2.3/16} is C{10.1.0.0/16}), IPv4-mapped IPv6 becomes IPv4.

    @raise InvalidValue: for anything else.
    """
    if not isinstance(text, str):
        raise InvalidValue(f"address: expected an IP address or CIDR range, got {text!r}")
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InvalidValue(
            f"address: expected an IP address or CIDR range, got {text!r}"
        ) from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            network = ipaddress.ip_network((mapped, network.prefixlen - 96))
    return network


@attrs.define(eq=False)
class ControlActions:
    """
    The operator actions on one daemon.

    @ivar config: the config in force (replaced by L{reload}).
    @ivar store: where overrides are saved (L{ollamamq.store.Store} or anything with
        its C{put*}/C{delete*} methods).
    @ivar probe: probes a backend now (added backends, changed URLs).
    @ivar loadConfig: reads the config file again and returns the new L{Config}; raises
        L{ConfigError}. L{None} when the daemon has no config file.
    @ivar reconfigure: called with a reloaded config, after the pool and the scheduler
        took it: the other components that hold the config (identity, models, relay,
        health, HTTP front).
    """

    config: Config
    pool: BackendPool
    scheduler: Scheduler
    store: Any
    events: EventHub
    probe: Callable[[Backend], Any] = lambda backend: None
    loadConfig: Callable[[], Config] | None = None
    reconfigure: list[Callable[[Config], Any]] = attrs.field(factory=list)
    # When the daemon started, on the hub's clock (for the uptime in snapshots).
    _startedAt: float = attrs.field(init=False, default=0.0)
    _users: dict[str, UserOverride] = attrs.field(factory=dict)
    _blocks: dict[IPNetwork, None] = attrs.field(factory=dict)
    _backends: dict[str, BackendOverride] = attrs.field(factory=dict)
    _described: dict[str, dict] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self._startedAt = self.events.clock.seconds()
        self.scheduler.subscribe(self.events.publish)
        self.pool.subscribe(self._poolChanged)
        self._described = {b.name: self._backendEntry(b) for b in self.pool.backends}

    # --- startup ---

    def restore(self, state: State) -> None:
        """
        Apply the overrides read from the store at startup (before serving).
        Overrides the current code cannot apply (a value made invalid by a newer rule) are
        logged and skipped, never fatal.
        """
        for override in state.users.values():
            try:
                _checkName("user", override.user)
                self._users[override.user] = override
                self._applyUser(override.user)
            except (InvalidValue, ValueError) as e:
                log.warn("Ignoring saved policy of user {user!r}: {e}", user=override.user, e=e)
                self._users.pop(override.user, None)
        for text in state.blocks:
            try:
                network = parseNetwork(text)
            except InvalidValue as e:
                log.warn("Ignoring saved block {text!r}: {e}", text=text, e=e)
                continue
            self._blocks[network] = None
            self.scheduler.blockNetwork(network)
        for override in state.backends.values():
            self._backends[override.name] = override
            try:
                self._applyBackend(override)
            except (ConfigError, InvalidValue, ValueError) as e:
                log.warn("Ignoring saved backend change {name!r}: {e}", name=override.name, e=e)
                del self._backends[override.name]

    # --- reading ---

    def totals(self) -> dict:
        """
        The C{totals} event's payload.
        """
        backends = self.pool.backends
        return {
            "queued": self.scheduler.queued,
            "active": self.scheduler.active,
            "users": len(self.scheduler.snapshot()),
            "backends": len(backends),
            "online": sum(b.online for b in backends),
        }

    def snapshot(self) -> dict:
        """
        Totals and every backend: C{{"queued", "active", "users", "blocked",
        "backends", "uptime"}}.
        """
        return {
            "queued": self.scheduler.queued,
            "active": self.scheduler.active,
            "users": len(self.scheduler.snapshot()),
            "blocked": len(self._blocks),
            "backends": [self._backendEntry(b) for b in self.pool.backends],
            "uptime": self.events.clock.seconds() - self._startedAt,
        }

    def status(self) -> dict:
        """
        The C{/proxy/status} document (DESIGN.md section 4), with each user's C{runtime}
        fields and C{blocked} flag, and every backend's C{source}.
        """
        return {
            "backends": [self._backendEntry(b) for b in self.pool.backends],
            "users": self.users(),
            "blocked_ips": [str(n) for n in self.scheduler.blockedNetworks()],
            "queued": self.scheduler.queued,
            "active": self.scheduler.active,
        }

    def users(self) -> list[dict]:
        """
        Every known user, by id, as L{user} describes them.
        """
        return [self._userEntry(entry) for entry in self.scheduler.snapshot()]

    def user(self, user: str) -> dict:
        """
        One user's entry: the scheduler's (C{id, priority, weight, max_queued, blocked,
        queued, active, served}) plus C{runtime}, the fields set at runtime.

        @raise UnknownUser: when the user is not known.
        """
        entry = self.scheduler.user(user)
        if entry is None:
            raise UnknownUser(f"no user {user!r}")
        return self._userEntry(entry)

    def queue(self, user: str | None = None, limit: int | None = None) -> list[dict]:
        """
        Queued requests in predicted dispatch order (see L{Scheduler.queuedRequests}),
        the first C{limit} of them.
        """
        return self.scheduler.queuedRequests(user, limit)

    def queuedCount(self, user: str | None = None) -> int:
        """
        How many requests are queued (for C{user}).
        """
        if user is None:
            return self.scheduler.queued
        entry = self.scheduler.user(user)
        return 0 if entry is None else entry["queued"]

    def blocked(self) -> list[dict]:
        """
        Blocked addresses and ranges: C{{"address", "source"}}.
        """
        return [
            {"address": str(n), "source": "runtime"} for n in self.scheduler.blockedNetworks()
        ]

    def _userEntry(self, entry: dict) -> dict:
        """
        Add where each value comes from to a scheduler entry.
        """
        override = self._users.get(entry["id"])
        runtime = []
        if override is not None:
            runtime = [f for f in USER_FIELDS if getattr(override, f) is not None]
        return dict(entry, runtime=runtime)

    def _backendEntry(self, backend: Backend) -> dict:
        """
        A backend's C{/proxy/status} entry plus its C{source}.
        """
        override = self._backends.get(backend.name)
        source = "runtime" if override is not None and override.added else "config"
        return dict(backend.describe(), source=source)

    # --- users ---

    def setUser(
        self,
        user: str,
        priority: Any = _MISSING,
        weight: Any = _MISSING,
        maxQueued: Any = _MISSING,
        blocked: Any = _MISSING,
    ) -> Deferred[dict]:
        """
        Change a user's runtime policy; fields left out stay. C{maxQueued} 0 or L{None}
        drops the runtime limit. Everything is checked before anything changes.

        @return: fires with the user's entry once saved.
        @raise InvalidValue: naming the first bad field.
        """
        _checkName("user", user)
        old = self._users.get(user) or UserOverride(user=user)
        changes: dict[str, Any] = {}
        if priority is not _MISSING and priority is not None:
            changes["priority"] = checkPriority(priority)
        if weight is not _MISSING and weight is not None:
            changes["weight"] = checkWeight(weight)
        if maxQueued is not _MISSING:
            if maxQueued is None:
                changes["maxQueued"] = None
            else:
                changes["maxQueued"] = _checkCount("max_queued", maxQueued, 0) or None
        if blocked is not _MISSING and blocked is not None:
            if not isinstance(blocked, bool):
                raise InvalidValue(f"blocked: expected true or false, got {blocked!r}")
            # The config blocks nobody: unblocking just drops the runtime block.
            changes["blocked"] = True if blocked else None
        override = attrs.evolve(old, **changes)
        if override.isEmpty():
            self._users.pop(user, None)
            saved = self.store.deleteUser
        else:
            self._users[user] = override
            saved = self.store.putUser
        self._applyUser(user)
        entry = self.user(user)
        self.events.publish("policy.changed", {"user": entry})
        return saved(override.user if override.isEmpty() else override).addCallback(
            lambda _: self.user(user)
        )

    def clearUser(self, user: str) -> Deferred[dict]:
        """
        Drop every runtime value of a user; the config's (or the defaults) apply again.

        @raise UnknownUser: when the user is not known.
        """
        entry = self.scheduler.user(user)
        if entry is None and user not in self._users:
            raise UnknownUser(f"no user {user!r}")
        self._users.pop(user, None)
        self._applyUser(user)
        entry = self.user(user)
        self.events.publish("policy.changed", {"user": entry})
        return self.store.deleteUser(user).addCallback(lambda _: entry)

    def _applyUser(self, user: str) -> None:
        """
        Give the scheduler a user's effective policy: the runtime values over the config's
        over the defaults.
        """
        configured = self.config.users.get(user)
        base = configured if configured is not None else UserConfig()
        override = self._users.get(user)
        if override is None or override.isEmpty():
            # Also makes an unknown user known (a PUT with nothing to override answers
            # its entry); it is forgotten again once idle.
            self.scheduler.resetPolicy(
                user, priority=base.priority, weight=base.weight, maxQueued=base.maxQueued
            )
            return
        self.scheduler.setPolicy(
            user,
            priority=override.priority or base.priority,
            weight=override.weight if override.weight is not None else base.weight,
        )
        self.scheduler.setMaxQueued(
            user, override.maxQueued if override.maxQueued is not None else base.maxQueued
        )
        self.scheduler.setBlocked(user, bool(override.blocked))

    # --- addresses ---

    def blockAddress(self, address: Any) -> Deferred[dict]:
        """
        Block an address or range; queued requests from it fail with 403 at once.

        @raise InvalidValue: when it is neither.
        """
        network = parseNetwork(address)
        self._blocks[network] = None
        self.scheduler.blockNetwork(network)
        self.events.publish("policy.changed", {"address": str(network), "blocked": True})
        entry = {"address": str(network), "source": "runtime"}
        return self.store.putBlock(str(network)).addCallback(lambda _: entry)

    def unblockAddress(self, address: Any) -> Deferred[str]:
        """
        Lift a runtime block.

        @raise InvalidValue: when C{address} is not an address or range.
        @raise UnknownAddress: when it is not blocked.
        """
        network = parseNetwork(address)
        if network not in self._blocks:
            raise UnknownAddress(f"{network} is not blocked")
        del self._blocks[network]
        self.scheduler.unblockNetwork(network)
        self.events.publish("policy.changed", {"address": str(network), "blocked": False})
        return self.store.deleteBlock(str(network)).addCallback(lambda _: str(network))

    # --- backends ---

    def _get(self, name: Any) -> Backend:
        """
        @raise UnknownBackend: when no backend has that name.
        """
        if not isinstance(name, str):
            raise UnknownBackend(f"no backend named {name!r}")
        for backend in self.pool.backends:
            if backend.name == name:
                return backend
        raise UnknownBackend(f"no backend named {name!r}")

    def _configured(self, name: str) -> Any:
        """
        The config's entry for a backend, or L{None}.
        """
        for b in self.config.backends:
            if b.name == name:
                return b
        return None

    def addBackend(self, url: Any, name: Any = None, slots: Any = None) -> Deferred[dict]:
        """
        Add a backend at runtime and probe it at once.

        @raise InvalidValue: for a bad URL, name or slots.
        @raise DuplicateBackend: when the name is taken.
        """
        try:
            url = backendURL("url", url)
        except ConfigError as e:
            raise InvalidValue(str(e)) from None
        name = defaultBackendName(url) if name is None else _checkName("name", name)
        slots = 1 if slots is None else _checkCount("slots", slots, 1)
        if any(b.name == name for b in self.pool.backends):
            raise DuplicateBackend(f"a backend named {name!r} already exists")
        configured = self._configured(name)
        if configured is not None and configured.url == url:
            # Adding back a configured backend removed at runtime: the removal is undone.
            override = BackendOverride(name=name, slots=None if slots == configured.slots
                                       else slots)
        else:
            override = BackendOverride(name=name, url=url, slots=slots, added=True)
        self._backends[name] = override
        backend = self.pool.add(Backend(name=name, url=url, slots=slots))
        self.probe(backend)
        return self._saveBackend(override).addCallback(lambda _: self._backendEntry(backend))

    def removeBackend(self, name: Any) -> Deferred[str]:
        """
        Remove a backend: requests running on it finish; nothing new goes there.

        @raise UnknownBackend: when no backend has that name.
        """
        backend = self._get(name)
        self.pool.remove(backend.name)
        if self._configured(backend.name) is not None:
            override = BackendOverride(name=backend.name, removed=True)
            self._backends[backend.name] = override
            d = self._saveBackend(override)
        else:
            self._backends.pop(backend.name, None)
            d = self.store.deleteBackend(backend.name)
        return d.addCallback(lambda _: backend.name)

    def drainBackend(self, name: Any, draining: bool = True) -> Deferred[dict]:
        """
        Drain (or undrain) a backend.

        @raise UnknownBackend: when no backend has that name.
        """
        backend = self._get(name)
        old = self._backends.get(backend.name) or BackendOverride(name=backend.name)
        override = attrs.evolve(old, draining=True if draining else None)
        self._backends[backend.name] = override
        self.pool.drain(backend.name, draining)
        return self._saveBackend(override).addCallback(lambda _: self._backendEntry(backend))

    def setSlots(self, name: Any, slots: Any) -> Deferred[dict]:
        """
        Set a backend's slots.

        @raise UnknownBackend: when no backend has that name.
        @raise InvalidValue: for slots below 1.
        """
        backend = self._get(name)
        slots = _checkCount("slots", slots, 1)
        old = self._backends.get(backend.name) or BackendOverride(name=backend.name)
        configured = self._configured(backend.name)
        if old.added:
            override = attrs.evolve(old, slots=slots)
        else:
            same = configured is not None and configured.slots == slots
            override = attrs.evolve(old, slots=None if same else slots)
        self._backends[backend.name] = override
        self.pool.setSlots(backend.name, slots)
        return self._saveBackend(override).addCallback(lambda _: self._backendEntry(backend))

    def _saveBackend(self, override: BackendOverride) -> Deferred[None]:
        """
        Save a backend override, or delete it when it says nothing.
        """
        if not override.added and not override.removed and (
            override.slots is None and override.draining is None
        ):
            self._backends.pop(override.name, None)
            return self.store.deleteBackend(override.name)
        return self.store.putBackend(override)

    def _applyBackend(self, override: BackendOverride) -> None:
        """
        Apply a saved backend override to the pool (startup, reload).
        """
        present = {b.name: b for b in self.pool.backends}
        backend = present.get(override.name)
        if override.removed:
            if backend is not None:
                self.pool.remove(override.name)
            return
        if override.added and backend is None:
            url = backendURL("url", override.url)
            backend = self.pool.add(
                Backend(name=override.name, url=url, slots=override.slots or 1)
            )
        if backend is None:
            # A change to a configured backend that the config no longer has.
            return
        if override.slots is not None:
            self.pool.setSlots(backend.name, override.slots)
        if override.draining is not None:
            self.pool.drain(backend.name, override.draining)

    def _poolChanged(self) -> None:
        """
        Publish a C{backend.changed} event for every backend whose entry changed.
        """
        seen = {}
        for backend in self.pool.backends:
            entry = self._backendEntry(backend)
            seen[backend.name] = entry
            if _comparable(self._described.get(backend.name)) != _comparable(entry):
                self.events.publish("backend.changed", entry)
        for name in self._described:
            if name not in seen:
                self.events.publish("backend.changed", {"name": name, "removed": True})
        self._described = seen

    # --- requests ---

    def cancelRequest(self, requestId: Any) -> str:
        """
        Cancel a queued request by id.

        @raise UnknownRequest: when no queued request has that id.
        """
        if not isinstance(requestId, str) or not self.scheduler.cancelQueued(requestId):
            raise UnknownRequest(f"no queued request {requestId!r}")
        return requestId

    # --- reload ---

    def reload(self) -> list[str]:
        """
        Re-read the config file and apply it; see the module docstring of
        L{ollamamq.control.amp.Reload}. The runtime overrides stay on top.

        @return: what changed, one line each.
        @raise ReloadFailed: when there is no config file or it is invalid; nothing
            changed then.
        """
        if self.loadConfig is None:
            message = "the daemon was started without --config: nothing to reload"
            log.warn("Reload refused: {message}", message=message)
            raise ReloadFailed(message)
        try:
            new = self.loadConfig()
        except (ConfigError, ValueError) as e:
            log.error("Reload refused, the old config stays: {error}", error=e)
            raise ReloadFailed(str(e)) from None
        old = self.config
        changes = self._configChanges(old, new)
        self.config = new
        self._reloadBackends(old, new)
        self.scheduler.reconfigure(new)
        for user in set(self._users) | set(old.users) | set(new.users):
            self._applyUser(user)
        for hook in self.reconfigure:
            hook(new)
        log.info("Config reloaded: {changes}", changes="; ".join(changes) or "no changes")
        self.events.publish("config.reloaded", {"changes": changes})
        return changes

    def _reloadBackends(self, old: Config, new: Config) -> None:
        """
        Add, remove (drain) and change backends as the new config says, keeping the
        runtime overrides on top.
        """
        oldByName = {b.name: b for b in old.backends}
        present = {b.name: b for b in self.pool.backends}
        for configured in new.backends:
            override = self._backends.get(configured.name)
            if override is not None and override.removed:
                continue
            backend = present.get(configured.name)
            if backend is None:
                backend = self.pool.add(
                    Backend(name=configured.name, url=configured.url,
                            slots=configured.slots or 1,
                            slotsFromBackend=configured.slots is None)
                )
                self.probe(backend)
            elif override is not None and override.added:
                # Now configured too: the config's definition takes over.
                self._backends.pop(configured.name, None)
                self.store.deleteBackend(configured.name)
                override = None
            if backend.url != configured.url:
                backend.url = configured.url
                self.probe(backend)
            if override is None or override.slots is None:
                if configured.slots is None:
                    # No slots configured: what the backend reports (health.readFacts).
                    backend.slotsFromBackend = True
                elif backend.slots != configured.slots or backend.slotsFromBackend:
                    self.pool.setSlots(backend.name, configured.slots)
            if override is not None:
                self._applyBackend(override)
        newNames = {b.name for b in new.backends}
        for name in oldByName:
            override = self._backends.get(name)
            if name in newNames or (override is not None and override.added):
                continue
            if name in present:
                self.pool.remove(name)
            if override is not None:
                del self._backends[name]
                self.store.deleteBackend(name)

    @staticmethod
    def _configChanges(old: Config, new: Config) -> list[str]:
        """
        What differs between two configs, one line per backend, user or setting.
        """
        changes = []
        oldBackends = {b.name: b for b in old.backends}
        newBackends = {b.name: b for b in new.backends}
        for name in newBackends.keys() - oldBackends.keys():
            changes.append(f"backend {name} added")
        for name in oldBackends.keys() - newBackends.keys():
            changes.append(f"backend {name} removed (draining)")
        for name in newBackends.keys() & oldBackends.keys():
            if newBackends[name] != oldBackends[name]:
                changes.append(f"backend {name} changed")
        for user in new.users.keys() - old.users.keys():
            changes.append(f"user {user} added")
        for user in old.users.keys() - new.users.keys():
            changes.append(f"user {user} removed")
        for user in new.users.keys() & old.users.keys():
            if new.users[user] != old.users[user]:
                changes.append(f"user {user} changed")
        if dict(new.models) != dict(old.models):
            changes.append("models changed")
        for field in attrs.fields(Config):
            if field.name in ("backends", "users", "models"):
                continue
            if getattr(old, field.name) != getattr(new, field.name):
                if field.name in RESTART_FIELDS:
                    changes.append(f"{field.name} changed (takes effect after a restart)")
                else:
                    changes.append(f"{field.name} changed")
        return sorted(changes)


def _comparable(entry: dict | None) -> dict | None:
    """
    A backend entry without the probe's latency, which changes every round and is not
    news to an operator.
    """
    if entry is None:
        return None
    return {k: v for k, v in entry.items() if k != "latency"}


def checkedNames(values: Iterable[Any]) -> list[str]:
    """
    Event name filters: non-empty strings.

    @raise InvalidValue: for anything else.
    """
    names = list(values)
    for value in names:
        if not isinstance(value, str) or not value:
            raise InvalidValue(f"names: expected non-empty strings, got {value!r}")
    return names
