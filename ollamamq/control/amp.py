# -*- test-case-name: tests.test_control_amp -*-
"""
The AMP commands of the control socket, shared by the daemon (L{ollamamq.control.server})
and its clients (the console, scripts).

Conventions
===========

  - Argument and response names and error codes are bytes (AMP on Python 3 requires it);
    responders return dicts with C{str} keys.
  - Every error a command can answer is one of the exceptions below, each with its own
    code; the message (C{str(error)}) says what was wrong and is meant for a human.
    Anything else a responder raises reaches the client as L{InternalError}: the daemon
    logs the traceback and the connection stays up.
  - An AMP value holds at most 65535 bytes, so the listings that grow with use (users,
    queued requests, blocked addresses) are paged: they take C{offset} and C{limit} and
    answer C{total} and C{next}, the offset of the next page, or L{None} on the last page.
    The daemon may return fewer than C{limit} rows to keep a page within the limit (a page
    has at least one row while rows remain). L{Snapshot} carries the totals and the
    backends, which are few.
  - Optional arguments left out mean "unchanged" (L{SetUser}) or "the default".

Events
======

A client that sent L{Subscribe} gets L{Event} commands from the daemon: C{name} and a JSON
object C{payload}. Names and payloads (fields may be added, never renamed):

  - C{request.queued}: C{{"id", "user", "model", "peer", "queued"}} (C{queued}: the
    user's queued count after it).
  - C{request.started}: C{{"id", "user", "model", "backend", "waited"}} (seconds queued).
  - C{request.finished}: C{{"id", "user", "model", "backend", "duration"}}.
  - C{request.accounted}: C{{"id", "user", "model", "tokens": {"prompt", "completion"}}},
    once a finished request's token counts are known (the backend reported them).
  - C{request.cancelled}: C{{"id", "user", "model", "reason"}}; C{reason} is C{"client"}
    (went away while queued), C{"operator"} (L{CancelRequest}), C{"blocked"} (its user or
    address was blocked) or C{"failed"} (refused while queued: timeout, no backend left).
  - C{backend.changed}: a backend's entry as in C{/proxy/status} (C{"name", "url",
    "state", "online", "kind", "slots", "active", "draining", "models", "loaded",
    "error", "source"}), or C{{"name", "removed": true}} once it left the pool.
  - C{policy.changed}: C{{"user": entry}} for a user, the entry as in C{/proxy/status}
    (C{"id", "priority", "weight", "max_queued", "blocked", "queued", "active",
    "served", "runtime"}), or C{{"address", "blocked"}} for an address block.

JSON payloads use C{/proxy/status}'s field names (C{max_queued}); the AMP rows below use
camelCase (C{maxQueued}), as AMP arguments do.
  - C{config.reloaded}: C{{"changes": [str]}}.
  - C{totals}: C{{"queued", "active", "users", "backends", "online"}}, coalesced: at most
    twice a second, and only when a total changed.
  - C{events.dropped}: C{{"count"}}: the client fell behind and this many events were not
    sent; it should take a new snapshot.

Flow control: the daemon keeps at most a small, fixed number of unanswered L{Event}s in
flight per subscriber. A subscriber that does not answer (stopped reading) gets nothing
more until it does; what it missed is counted and announced with one
C{events.dropped}, so a stuck console never grows the daemon's memory.
"""

from __future__ import annotations

from twisted.protocols import amp

PROTOCOL_VERSION = 1
"""
The version of this set of commands; L{Version} answers it. Raised when a command or
field changes incompatibly (additions keep it).
"""

PAGE_LIMIT = 200
"""
The most rows a paged listing returns when the client asks for more or gives no limit.
"""


# --- errors ---


class ControlError(Exception):
    """
    Base of the errors the control commands answer. C{str(error)} is the message.
    """

    code: bytes = b"CONTROL_ERROR"

    def __str__(self) -> str:
        return self.args[0] if self.args else self.__class__.__name__


class UnknownUser(ControlError):
    """
    No user has that id (neither configured, nor with a runtime override, nor recently
    active).
    """

    code = b"UNKNOWN_USER"


class UnknownBackend(ControlError):
    """
    No backend has that name.
    """

    code = b"UNKNOWN_BACKEND"


class DuplicateBackend(ControlError):
    """
    A backend with that name is already in the pool.
    """

    code = b"DUPLICATE_BACKEND"


class UnknownRequest(ControlError):
    """
    No queued request has that id (it may have started, finished or been cancelled).
    """

    code = b"UNKNOWN_REQUEST"


class UnknownAddress(ControlError):
    """
    That address or range is not blocked at runtime.
    """

    code = b"UNKNOWN_ADDRESS"


class InvalidValue(ControlError):
    """
    An argument is not valid; the message names it and says what is expected.
    """

    code = b"INVALID_VALUE"


class ReloadFailed(ControlError):
    """
    The config file could not be read or is invalid: nothing changed; the message names
    the problem.
    """

    code = b"RELOAD_FAILED"


class UnknownKey(ControlError):
    """
    The user has no minted key with that prefix.
    """

    code = b"UNKNOWN_KEY"


class InternalError(ControlError):
    """
    The daemon failed to carry out the command (a bug); it logged the details. The
    connection stays up.
    """

    code = b"INTERNAL_ERROR"


ERRORS: dict[type[Exception], bytes] = {
    cls: cls.code
    for cls in (
        UnknownUser,
        UnknownBackend,
        DuplicateBackend,
        UnknownRequest,
        UnknownAddress,
        InvalidValue,
        ReloadFailed,
        UnknownKey,
        InternalError,
    )
}
"""
Every error code any command may answer.
"""


# --- row shapes ---

BACKEND_ROW = [
    (b"name", amp.Unicode()),
    (b"url", amp.Unicode()),
    (b"state", amp.Unicode()),  # "unknown", "online", "offline"
    (b"online", amp.Boolean()),
    (b"kind", amp.Unicode(optional=True)),  # "ollama", "openai"; None before a probe
    (b"slots", amp.Integer()),
    (b"active", amp.Integer()),
    (b"draining", amp.Boolean()),
    (b"models", amp.ListOf(amp.Unicode())),
    (b"loaded", amp.ListOf(amp.Unicode())),
    (b"error", amp.Unicode(optional=True)),  # the last probe's failure
    (b"source", amp.Unicode()),  # "config" or "runtime" (added at runtime)
]
"""
One backend, as in C{/proxy/status}.
"""

USER_ROW = [
    (b"id", amp.Unicode()),
    (b"priority", amp.Unicode()),  # "vip", "boost", "normal"
    (b"weight", amp.Float()),
    (b"maxQueued", amp.Integer(optional=True)),  # None: the server-wide limit
    (b"blocked", amp.Boolean()),
    (b"queued", amp.Integer()),
    (b"active", amp.Integer()),
    (b"served", amp.Integer()),
    # The fields whose value is a runtime change, not the config: any of "priority",
    # "weight", "maxQueued", "blocked".
    (b"runtime", amp.ListOf(amp.Unicode())),
]
"""
One user: the policy in force and where each value comes from, and the counts.
"""

QUEUE_ROW = [
    (b"id", amp.Unicode()),
    (b"position", amp.Integer()),  # 1 = dispatched next
    (b"user", amp.Unicode()),
    (b"model", amp.Unicode(optional=True)),
    (b"waited", amp.Float()),  # seconds queued so far
    (b"peer", amp.Unicode(optional=True)),
]
"""
One queued request, in predicted dispatch order.
"""

ADDRESS_ROW = [
    (b"address", amp.Unicode()),  # an address or a CIDR range, normalised
    (b"source", amp.Unicode()),  # "config" or "runtime"
]
"""
One blocked address or range.
"""

_PAGE_ARGUMENTS = [
    (b"offset", amp.Integer(optional=True)),  # default 0
    (b"limit", amp.Integer(optional=True)),  # default and maximum PAGE_LIMIT
]

_PAGE_RESPONSE = [
    (b"total", amp.Integer()),
    (b"next", amp.Integer(optional=True)),  # offset of the next page; None: last page
]


# --- commands ---


class Version(amp.Command):
    """
    The protocol version (L{PROTOCOL_VERSION}) and the daemon's version.
    """

    arguments: list = []
    response = [(b"protocol", amp.Integer()), (b"daemon", amp.Unicode())]
    errors = ERRORS


class Snapshot(amp.Command):
    """
    The daemon's state at a glance: totals and every backend. Users, queued requests and
    blocked addresses come from the paged listings.
    """

    arguments: list = []
    response = [
        (b"queued", amp.Integer()),
        (b"active", amp.Integer()),
        (b"users", amp.Integer()),  # rows of ListUsers
        (b"blocked", amp.Integer()),  # rows of ListBlocked
        (b"backends", amp.AmpList(BACKEND_ROW)),
        (b"uptime", amp.Float()),  # seconds since the daemon started
    ]
    errors = ERRORS


class ListUsers(amp.Command):
    """
    A page of users (configured, with a runtime override, or recently active), by id.
    """

    arguments = _PAGE_ARGUMENTS
    response = [(b"users", amp.AmpList(USER_ROW))] + _PAGE_RESPONSE
    errors = ERRORS


class ListQueue(amp.Command):
    """
    A page of queued requests in predicted dispatch order (position 1 goes next when a
    slot that can serve it frees), optionally only one user's.
    """

    arguments = _PAGE_ARGUMENTS + [(b"user", amp.Unicode(optional=True))]
    response = [(b"requests", amp.AmpList(QUEUE_ROW))] + _PAGE_RESPONSE
    errors = ERRORS


class ListBlocked(amp.Command):
    """
    A page of blocked addresses and ranges.
    """

    arguments = _PAGE_ARGUMENTS
    response = [(b"addresses", amp.AmpList(ADDRESS_ROW))] + _PAGE_RESPONSE
    errors = ERRORS


class SetUser(amp.Command):
    """
    Change a user's policy at runtime; arguments left out stay as they are. The change is
    persisted and wins over the config until L{ClearUser}. C{maxQueued=0} drops the
    runtime limit: the config's (or the server-wide) limit applies again;
    C{blocked=False} lifts a runtime block. Blocking answers the user's queued requests with 403 at once
    and refuses new ones with 403. An unknown user is created (so a policy can be set
    before the user's first request).

    Errors: L{InvalidValue} (unknown priority, weight not positive, negative maxQueued,
    empty user id).
    """

    arguments = [
        (b"user", amp.Unicode()),
        (b"priority", amp.Unicode(optional=True)),
        (b"weight", amp.Float(optional=True)),
        (b"maxQueued", amp.Integer(optional=True)),
        (b"blocked", amp.Boolean(optional=True)),
    ]
    response = USER_ROW
    errors = ERRORS


class ClearUser(amp.Command):
    """
    Drop every runtime override of a user: the config's values (or the defaults) apply
    again, and a runtime block is lifted.

    Errors: L{UnknownUser}.
    """

    arguments = [(b"user", amp.Unicode())]
    response = USER_ROW
    errors = ERRORS


class BlockAddress(amp.Command):
    """
    Block an address (C{10.1.2.3}, C{::1}) or a CIDR range (C{10.1.0.0/16}): its requests
    get 403 at admission, and those already queued are answered 403 at once. Persisted.

    Errors: L{InvalidValue} (not an address or range).
    """

    arguments = [(b"address", amp.Unicode())]
    response = ADDRESS_ROW
    errors = ERRORS


class UnblockAddress(amp.Command):
    """
    Lift a runtime block of an address or range (given as when blocked; it is normalised
    the same way).

    Errors: L{InvalidValue}, L{UnknownAddress} (not blocked at runtime).
    """

    arguments = [(b"address", amp.Unicode())]
    response = [(b"address", amp.Unicode())]
    errors = ERRORS


class AddBackend(amp.Command):
    """
    Add a backend at runtime (persisted). It is probed at once and takes requests when
    found online. C{name} defaults to the URL's host (and port); C{slots} defaults to 1.

    Errors: L{InvalidValue} (bad URL, slots), L{DuplicateBackend}.
    """

    arguments = [
        (b"url", amp.Unicode()),
        (b"name", amp.Unicode(optional=True)),
        (b"slots", amp.Integer(optional=True)),
    ]
    response = BACKEND_ROW
    errors = ERRORS


class RemoveBackend(amp.Command):
    """
    Remove a backend: it takes nothing new, requests running on it finish, requests only
    it could serve get 503. Persisted: a configured backend stays removed across restarts
    and reloads until it is added again (L{AddBackend} with its URL).

    Errors: L{UnknownBackend}.
    """

    arguments = [(b"name", amp.Unicode())]
    response = [(b"name", amp.Unicode())]
    errors = ERRORS


class DrainBackend(amp.Command):
    """
    Drain a backend: it takes nothing new, running requests finish. Persisted.

    Errors: L{UnknownBackend}.
    """

    arguments = [(b"name", amp.Unicode())]
    response = BACKEND_ROW
    errors = ERRORS


class UndrainBackend(amp.Command):
    """
    Undo L{DrainBackend}: the backend takes requests again. Persisted.

    Errors: L{UnknownBackend}.
    """

    arguments = [(b"name", amp.Unicode())]
    response = BACKEND_ROW
    errors = ERRORS


class SetSlots(amp.Command):
    """
    Set how many requests the proxy runs on a backend at once (at least 1). Lowering it
    lets running requests finish. Persisted.

    Errors: L{UnknownBackend}, L{InvalidValue}.
    """

    arguments = [(b"name", amp.Unicode()), (b"slots", amp.Integer())]
    response = BACKEND_ROW
    errors = ERRORS


class CancelRequest(amp.Command):
    """
    Cancel a queued request by id (as in L{ListQueue}): its client gets a 503 saying an
    operator cancelled it. Running requests are not cancelled.

    Errors: L{UnknownRequest}.
    """

    arguments = [(b"id", amp.Unicode())]
    response = [(b"id", amp.Unicode())]
    errors = ERRORS


class MintKey(amp.Command):
    """
    Mint an API key for C{user}: the answer is the only time the key is shown; the state
    file keeps its digest only. It authenticates as C{user} from the answer on.

    Errors: L{InvalidValue} (a user id a key cannot name, or no state store).
    """

    arguments = [(b"user", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"prefix", amp.Unicode()), (b"key", amp.Unicode())]
    errors = ERRORS


class ListKeys(amp.Command):
    """
    C{user}'s minted keys: prefixes and creation times (never the keys), oldest first.

    Errors: L{InvalidValue}.
    """

    arguments = [(b"user", amp.Unicode())]
    response = [(b"keys", amp.AmpList([(b"prefix", amp.Unicode()), (b"created", amp.Float())]))]
    errors = ERRORS


class RevokeKey(amp.Command):
    """
    Revoke C{user}'s minted key named C{prefix}: refused from the answer on.

    Errors: L{UnknownKey}, L{InvalidValue}.
    """

    arguments = [(b"user", amp.Unicode()), (b"prefix", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"prefix", amp.Unicode())]
    errors = ERRORS


class Reload(amp.Command):
    """
    Re-read the config file: backends added, removed (they drain) or changed; users,
    keys, models and limits applied; queues, fairness counters and running requests
    kept. C{changes} says what changed, one line each.

    Errors: L{ReloadFailed} (unreadable or invalid file; nothing changed).
    """

    arguments: list = []
    response = [(b"changes", amp.ListOf(amp.Unicode()))]
    errors = ERRORS


class Subscribe(amp.Command):
    """
    Receive L{Event}s on this connection from now on. C{names}, when given, keeps only
    events whose name is in it or starts with one of its entries followed by a dot
    (C{["request"]} selects every C{request.*}). Subscribing again replaces the filter.
    """

    arguments = [(b"names", amp.ListOf(amp.Unicode(), optional=True))]
    response = [(b"subscribed", amp.Boolean())]
    errors = ERRORS


class Unsubscribe(amp.Command):
    """
    Stop receiving L{Event}s on this connection.
    """

    arguments: list = []
    response = [(b"subscribed", amp.Boolean())]
    errors = ERRORS


class Event(amp.Command):
    """
    Sent by the daemon to a subscriber: one event (see the module docstring). The client
    answers with an empty response as soon as it has taken the event; the daemon stops
    sending while too many are unanswered.
    """

    arguments = [(b"name", amp.Unicode()), (b"payload", amp.Unicode())]
    response: list = []


COMMANDS = (
    Version,
    Snapshot,
    ListUsers,
    ListQueue,
    ListBlocked,
    SetUser,
    ClearUser,
    BlockAddress,
    UnblockAddress,
    AddBackend,
    RemoveBackend,
    DrainBackend,
    UndrainBackend,
    SetSlots,
    CancelRequest,
    Reload,
    Subscribe,
    Unsubscribe,
)
"""
The commands a client sends to the daemon (L{Event} goes the other way).
"""
