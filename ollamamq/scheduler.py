# -*- test-case-name: tests.test_scheduler -*-
"""
The fair-share scheduler: per-user queues, priorities, admission limits; it hands out
backend slots as L{Lease}s.

Requests wait here, never inside a backend: a backend is given a request only when it has
a free slot (L{BackendPool.choose} returns only such backends), so it never runs more than
C{slots} requests from the proxy.

Fairness
========

Start-time fair queuing, which is also the "virtual token counter" of Sheng et al.,
I{Fairness in Serving Large Language Models} (OSDI 2024). Every user has a service
counter C{S}. When a slot is free, the request dispatched is the head of the user with the
lowest C{S} among the users with a queued request that a free slot can serve; dispatching
advances that user's C{S} by C{cost / weight} (the cost is one request by default, see
L{REQUEST_COST}, or lease seconds, see I{Service in lease seconds} below). Ties go to the
older request.

  - Priorities are tiers: every C{vip} request that a free slot can serve goes before any
    other request; within a tier users share by weight. C{boost} doubles the user's weight.
    Each tier keeps its own counters and virtual time.
  - No banking of idle time: a user whose queue was empty starts at
    C{max(own S, V)}, where the virtual time C{V} of the request's class (kinds, model) is
    the lower of the start counter of the last request dispatched from that class and the
    lowest counter among the users backlogged in it; when nobody is backlogged in the class
    it is the tier's last dispatched start counter. Taking the lower of the two makes a
    newcomer go next: with A holding 100 queued requests, B arrives at the counter A had
    when A's last request started, below A's current one.
  - A retried request (L{Lease.retry}) is not charged: its charge is refunded and it goes
    back ahead of that user's queue, with its original position.

Bound. Within one tier and for requests that every free slot can serve (one model, no
retries, no policy changes while it runs), while user I{i} stays backlogged, any other
user I{j} is dispatched at most C{floor(w_j / w_i) + 1} times between two consecutive
dispatches of I{i} (or before I{i}'s first one): all of I{j}'s counters lie in
C{[S_i - 1/w_i, S_i]} when dispatched, spaced C{1/w_j} apart. So I{i} waits at most
C{B_i = sum over j != i of (floor(w_j / w_i) + 1)} dispatches; with I{n} equal users that is
C{2(n - 1)}. C{tests.test_scheduler} asserts the per-pair form on random workloads.

Across models the counters measure a user's total service: a user whose requests wait for
a busy model keeps a low counter and, asking for another model too, is served first there.
The backend for the chosen request is the pool's choice (L{BackendPool.choose}: a backend
with the model loaded first); that can take the one free slot another model could have
used, which then waits for the next release.

Service in lease seconds
------------------------

Counting requests gives a user whose answers take three times as long three times the GPU
(C{bench/fairness.py}, scenario E). With C{[server] fair_share = "time"} the unit of service
is lease seconds instead: clock time from grant to release, a slot being one share of a
GPU. A request's duration is known only when it ends, so its charge comes in two parts:

  - At dispatch, a provisional C{estimate / weight}. The estimate is a smoothed mean (the
    newest lease weighs 0.2, L{_LEASE_SMOOTHING}) of the user's past lease durations for
    the same model, else for any model, else of every user's leases, else 1 second
    (L{DEFAULT_ESTIMATE}); never below L{MIN_ESTIMATE}. A burst of dispatches before
    anything finishes (many free slots) is thus already split by expected cost.
  - At release, a correction of C{(duration - estimate) / weight}, the weight being the
    one charged at dispatch, so a finished lease is charged exactly C{duration / weight}.
    A counter that goes down is re-pushed into the heaps at once, like a refund; one that
    goes up leaves lower bounds there, fixed lazily like any other charge.

A retried lease is refunded entirely, as in request mode, and teaches no estimate; a
forgotten idle user's estimates go with it. The idle rule is unchanged: a user becoming
backlogged starts at C{max(own S, V)}, so a correction that lands while the user is idle
neither banks credit (its C{S} is raised to C{V}) nor is forgiven (a debt keeps C{S} above
C{V}).

Bound (lease seconds). Same conditions as for the bound above. Take an interval
during which user I{i} stays backlogged and is not dispatched, and let C{d_i} be the
longer of the duration and the estimate of I{i}'s last lease started before the interval
(0 if none). Then another user I{j}'s leases dispatched in the interval last in total at
most::

    (w_j / w_i) d_i + d_j + w_j e

seconds, where C{d_j} (at most I{j}'s longest lease) is the duration of the last of them
and C{e = 0} with one slot. Why: I{j} is dispatched only while C{S_j <= S_i}, and each of
its leases, once corrected, adds its duration C{/ w_j} to C{S_j}; C{S_i} stays within
C{d_i / w_i} of where I{i}'s last dispatch started, below which no backlogged counter (nor
C{V}) lies at that moment. With C{K} slots, corrections still pending move the counters:
C{e} sums the estimation errors C{|duration - estimate| / weight} that can work against
I{i} (I{i}'s underestimates and everyone's overestimates among the leases running when
I{i} was last dispatched or when the interval began, and I{j}'s underestimates among its
interval leases still running at its last dispatch there): at most C{3K - 2} leases, so
C{e <= (3K - 2) err / w_min} for C{err} the largest estimation error.
C{tests.test_scheduler} asserts the exact form (and C{e = 0} for one slot) on random
workloads with random durations. The slack does not accumulate: while two users stay
backlogged, their lease seconds divided by their weights differ by a bounded amount, so
their shares converge to the weights.

FIFO
====

Each user's requests are served oldest first I{per class}: a class is the set of backends
a request can use, i.e. its API kinds, its model, and (for a retried request) the backends
already tried. A user's request for a model whose backends are all busy does not hold up
the same user's request for a model that has a free slot; among the requests of one user
that a free slot can serve, the oldest goes first.

Cost
====

Each class keeps two heaps (VIP and the rest) of C{(S, head sequence, push id, queue)}
entries, one entry per user with requests in the class, with lazy deletion: an entry is
valid while its queue still points at it; a dispatch raises the user's counter without
touching the user's entries in other classes (their keys become lower bounds, fixed with
one re-push when they reach the top); cancellation marks the ticket and removes it when it
reaches the head. Keys that go I{down} (refund, a retried request put ahead, a priority
change, a lease that ended before its estimate) are re-pushed at once. Heaps and queues are
compacted when more than half of their entries are dead, so memory stays proportional to
what is queued.

One dispatch decision costs O(F + sum over the F backends with free slots of
min(M_b, C) + log U) amortized, for F free backends, M_b models on backend b, C classes
with queued requests and U users queued in the chosen class: it peeks the heap tops of the
classes the free backends serve and never scans the queue, so 10,000 queued requests cost
about what 10 do (see C{bench/scheduler.py}). Enqueue is O(B + log U) for B backends (the
admission check asks the pool whether anything serves the request); cancellation is O(1)
amortized. Queue timeouts use one timer and a deque (deadlines arrive in enqueue order);
forgetting idle users one timer and a heap with at most one entry per user. With
C{fair_share = "time"} a dispatch also looks up the user's estimate (two dict lookups), and
a release corrects the counter and, when the lease ended before its estimate, re-pushes the
user's entries: O(Q log U) for a user with queues in Q classes.

Reentrancy
==========

Deferreds are fired only after the scheduler's state is consistent, from one loop guarded
by a flag: a callback that releases its lease, enqueues again, cancels another request or
changes the pool re-enters the scheduler, which records the work and lets the running loop
do it.

Retry-After
===========

  - 429 (the user's queue is full): the expected time until that user gets its next slot
    under fair share, C{mean lease duration x backlogged users / slots serving the
    request}, at least 1 second. A slot of the user's queue frees with that dispatch.
  - 503 (no backend online for the model, a backend set change that leaves none, the
    total queue full, a queue timeout, shutting down): C{config.healthInterval}, the time
    until the next probe can bring a backend back; the same value for overload keeps
    clients from hammering a saturated proxy.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ollamamq.backends import ONLINE, Backend, BackendPool
from ollamamq.config import FAIR_SHARES, PRIORITIES, Config, IPNetwork
from ollamamq.errors import BadGateway, Forbidden, TooManyRequests, Unavailable

VIP = 0
NORMAL = 1

REQUEST_COST = 1.0
"""
What one dispatched request costs the user's counter (before dividing by the weight), with
C{fair_share = "requests"}.
"""

DEFAULT_ESTIMATE = 1.0
"""
Seconds a lease is expected to last before any lease has finished (C{fair_share = "time"}).
"""

MIN_ESTIMATE = 1e-3
"""
The least provisional duration (seconds) charged at dispatch with C{fair_share = "time"}:
a user whose leases took no measurable time must not be charged nothing, which would let
its burst take every free slot before the first correction.
"""

_LEASE_SMOOTHING = 0.2
"""
Weight of the newest lease duration in the running means: the one used for Retry-After
and, with C{fair_share = "time"}, the per-user estimates.
"""

_EPSILON = 1e-9
"""
Slack when comparing a deadline with the clock: C{callLater(deadline - now)} can land one
rounding step before C{deadline}.
"""

# How far a request is from a backend (Scheduler._reach).
_NONE = 0
_SOON = 1
_NOW = 2

# Ticket states.
_QUEUED = "queued"
_GRANTED = "granted"
_CANCELLED = "cancelled"
_FAILED = "failed"


def _kinds(kinds: Iterable[str]) -> frozenset[str]:
    """
    Accept any iterable of kinds; store a frozenset (hashable, so jobs can key classes).
    """
    return frozenset(kinds)


@attrs.frozen
class Job:
    """
    What a request needs from a backend.

    @ivar user: the user id (from L{ollamamq.identity}).
    @ivar kinds: the wire dialects a backend must speak (one of them) to serve it, as
        L{ollamamq.front.dialectsFor} gives them: C{{"ollama"}} for C{/api/*},
        C{{"openai"}} for C{/v1/*}, C{{"anthropic"}} for C{/v1/messages}.
    @ivar model: the canonical model key (L{ollamamq.models.canonicalModel}), or L{None}
        for a request any backend of a fitting kind can serve.
    @ivar peer: the client address the request came from (after trusted proxies), for
        per-address limits and blocks; L{None} when unknown.
    @ivar requestId: the proxy's id of the request (logs, headers, the control plane).
    @ivar size: bytes the queued request holds in memory (its body), for the queued-bytes
        bound.
    """

    user: str
    kinds: frozenset[str] = attrs.field(converter=_kinds)
    model: str | None = None
    peer: str | None = None
    requestId: str | None = None
    size: int = 0


@attrs.define(eq=False)
class Lease:
    """
    A slot on a backend, held while one request runs there.

    Exactly one of L{release} and L{retry} ends it; L{release} after either is a no-op.

    @ivar backend: where the request runs.
    @ivar job: the request.
    @ivar waited: seconds the request spent queued (clock time; a retried request counts
        every wait).
    """

    backend: Backend
    job: Job
    waited: float
    _scheduler: Scheduler = attrs.field(repr=False)
    _ticket: _Ticket = attrs.field(repr=False)
    _charge: float = attrs.field(repr=False)
    _grantedAt: float = attrs.field(repr=False)
    _finished: bool = attrs.field(default=False, repr=False)
    # The weight the charge was divided by: a correction uses it even after a policy change.
    _weight: float = attrs.field(default=1.0, repr=False)

    def release(self) -> None:
        """
        The request finished (or failed mid-stream): free the slot and dispatch the next
        request. Idempotent.
        """
        self._scheduler._release(self)

    def retry(self, exclude: bool = True) -> Deferred[Lease]:
        """
        The backend failed (or was busy) before the first response byte: free the slot
        without charging the user and queue the request again, ahead of the user's other
        requests for the model.

        @param exclude: the backend failed (the caller has marked it so): send the request
            to a backend it has not tried yet when another one serves it; when none does,
            it waits for the same backend to come back (the grace of the module
            docstring). With C{exclude=False} (the backend was busy) it may go anywhere.
        @return: fires with a new lease; errbacks with L{BadGateway} when no backend that
            was not tried yet serves the request (at once, or later when the pool changes
            so), L{Unavailable} when no backend will serve it any more, on a queue timeout
            or shutdown. Cancelling it removes the request like a queued one.
        @raise RuntimeError: when the lease was already released or retried.
        """
        return self._scheduler._retry(self, exclude)


@attrs.define(eq=False)
class _Ticket:
    """
    One queued request.

    @ivar seq: arrival order; a retried request keeps its own, which puts it ahead of the
        user's later requests.
    @ivar excluded: backends this request already failed on.
    @ivar waitedBefore: seconds queued before the current wait (for retried requests).
    """

    job: Job
    user: _User
    seq: int
    excluded: frozenset[Backend]
    queuedSince: float
    waitedBefore: float = 0.0
    state: str = _QUEUED
    deferred: Deferred[Lease] | None = None
    lease: Lease | None = None
    # The id the control plane knows it by: the job's request id, else one made up.
    id: str = ""


@attrs.define(eq=False)
class _Queue:
    """
    One user's FIFO of requests in one class.

    @ivar tickets: oldest first; may hold cancelled tickets (removed lazily).
    @ivar live: how many of C{tickets} are still queued.
    @ivar entry: this queue's one valid heap entry; any other entry naming this queue is
        dead.
    """

    user: _User
    cls: _Class
    tickets: deque[_Ticket] = attrs.field(factory=deque)
    live: int = 0
    entry: tuple | None = None

    def head(self) -> _Ticket | None:
        """
        The oldest queued ticket, dropping cancelled ones in front of it.
        """
        tickets = self.tickets
        while tickets and tickets[0].state != _QUEUED:
            tickets.popleft()
        return tickets[0] if tickets else None

    def insert(self, ticket: _Ticket) -> None:
        """
        Add a ticket in sequence order (new requests go last; a retried one goes ahead).
        """
        tickets = self.tickets
        if not tickets or tickets[-1].seq < ticket.seq:
            tickets.append(ticket)
        elif ticket.seq < tickets[0].seq:
            tickets.appendleft(ticket)
        else:
            # Rare (a retried request behind an even older one of the same class): O(n).
            self.tickets = deque(sorted([*tickets, ticket], key=lambda t: t.seq))
        self.live += 1

    def compact(self) -> None:
        """
        Drop cancelled tickets once they are the majority, so a queue whose head never moves
        does not grow with every cancelled request.
        """
        if len(self.tickets) > 2 * self.live + 8:
            self.tickets = deque(t for t in self.tickets if t.state == _QUEUED)


@attrs.define(eq=False)
class _Class:
    """
    The requests that the same backends can serve: same kinds, model and tried backends.

    @ivar heaps: per tier (L{VIP}, L{NORMAL}), entries C{(counter, head seq, push id,
        queue)}.
    @ivar members: queues with a valid entry.
    """

    key: tuple
    kinds: frozenset[str]
    model: str | None
    excluded: frozenset[Backend]
    heaps: tuple[list, list] = attrs.field(factory=lambda: ([], []))
    members: int = 0

    def servedBy(self, backend: Backend) -> bool:
        """
        Whether C{backend} can run this class's requests (slots and state aside).
        """
        return backend.serves(self.kinds, self.model) and backend not in self.excluded


@attrs.define(eq=False)
class _User:
    """
    A user's policy, counters and queues.

    @ivar counter: service received / weight, in the tier's virtual time.
    @ivar configured: named in the config file: never forgotten.
    @ivar policySet: given a policy through L{Scheduler.setPolicy}: never forgotten.
    @ivar meanLease: smoothed duration of the user's leases (C{fair_share = "time"}), or
        L{None} before the first one ends.
    @ivar modelLease: the same per model.
    @ivar maxRunning: leases the user may hold at once (L{None}: no limit). A user at the
        limit is I{capped}: its queues leave the heaps (their entries are dropped) until
        a lease ends, so dispatch never looks at them meanwhile.
    """

    id: str
    priority: str = "normal"
    weight: float = 1.0
    maxQueued: int | None = None
    maxRunning: int | None = None
    configured: bool = False
    policySet: bool = False
    counter: float = 0.0
    queued: int = 0
    active: int = 0
    served: int = 0
    queues: dict[tuple, _Queue] = attrs.field(factory=dict)
    idleSince: float = 0.0
    idlePending: bool = False
    meanLease: float | None = None
    modelLease: dict[str | None, float] = attrs.field(factory=dict)
    blocked: bool = False

    @property
    def tier(self) -> int:
        """
        L{VIP} or L{NORMAL}.
        """
        return VIP if self.priority == "vip" else NORMAL

    @property
    def capped(self) -> bool:
        """
        Whether the user holds as many leases as C{maxRunning} allows.
        """
        return self.maxRunning is not None and self.active >= self.maxRunning

    @property
    def effectiveWeight(self) -> float:
        """
        The share under contention: the weight, doubled for C{boost}.
        """
        return self.weight * 2 if self.priority == "boost" else self.weight


def _classKey(kinds: frozenset[str], model: str | None, excluded: frozenset[Backend]) -> tuple:
    """
    The key of the class of requests with these needs.
    """
    return (kinds, model, excluded)


class Scheduler:
    """
    Per-user queues with weighted fair sharing of backend slots; see the module docstring.
    """

    def __init__(self, pool: BackendPool, clock: IReactorTime, config: Config) -> None:
        """
        @param pool: the backends requests are given to; the scheduler subscribes to its
            changes.
        @param clock: the time source for waits, timeouts and forgetting idle users.
        @param config: limits (C{maxQueuedPerUser}, C{maxQueuedTotal}, C{queueTimeout},
            C{idleForget}, C{healthInterval}), the unit of service (C{fairShare}) and the
            configured users.
        @raise ValueError: for a C{fairShare} that is not one of L{FAIR_SHARES}.
        """
        if config.fairShare not in FAIR_SHARES:
            raise ValueError(
                f"fairShare must be one of {', '.join(FAIR_SHARES)}, got {config.fairShare!r}"
            )
        self._pool = pool
        self._clock = clock
        self._config = config
        self._timeShare = config.fairShare == "time"
        self._users: dict[str, _User] = {}
        for userID, userConfig in config.users.items():
            self._users[userID] = _User(
                id=userID,
                priority=userConfig.priority,
                weight=userConfig.weight,
                maxQueued=userConfig.maxQueued,
                maxRunning=(userConfig.maxRunning if userConfig.maxRunning is not None
                            else config.maxRunningPerUser),
                configured=True,
            )
        self._classes: dict[tuple, _Class] = {}
        self._byModel: dict[str | None, dict[tuple, _Class]] = {}
        # Start counter of the last dispatch, per (kinds, model) and tier, and per tier.
        self._lastStart: dict[tuple, list[float | None]] = {}
        self._tierStart = [0.0, 0.0]
        self._seq = itertools.count()
        self._pushes = itertools.count()
        self._queued = 0
        self._queuedBytes = 0
        self._peerQueued: dict[str, int] = {}
        self._active = 0
        self._backlogged = 0
        self._meanLease: float | None = None
        self._stopped = False
        # Deadlines arrive in enqueue order (one timeout for all), so a deque and one timer.
        self._deadlines: deque[tuple[float, _Ticket]] = deque()
        self._deadlineCall: IDelayedCall | None = None
        # At most one entry per user: (deadline, tiebreak, user); see _maybeIdle.
        self._idle: list[tuple[float, int, _User]] = []
        self._idleCall: IDelayedCall | None = None
        # Wakes _poolChanged when the grace of an unavailable backend ends.
        self._graceCall: IDelayedCall | None = None
        # Reentrancy: Deferreds to fire once the state is consistent, and the loop's flags.
        self._outbox: deque[tuple[Deferred[Lease], Lease | Exception]] = deque()
        self._running = False
        self._again = False
        # Users at their maxRunning whose queues were taken out of the heaps.
        self._capped: set[_User] = set()
        # The control plane's view: queued tickets by id, blocked networks by prefix
        # length (an admission check is one set lookup per length), event listeners.
        self._byId: dict[str, _Ticket] = {}
        self._blockedNets: dict[tuple[int, int], set[int]] = {}
        self._networks: set[IPNetwork] = set()
        self._listeners: list[Callable[[str, dict], None]] = []
        pool.subscribe(self._poolChanged)

    # --- public API ---

    @property
    def queued(self) -> int:
        """
        Requests waiting for a slot.
        """
        return self._queued

    @property
    def active(self) -> int:
        """
        Leases held (requests running on backends).
        """
        return self._active

    def enqueue(self, job: Job) -> Deferred[Lease]:
        """
        Queue a request.

        @return: fires with a L{Lease} once a slot is granted. Errbacks at once with
            L{Unavailable} when stopped, when no available backend serves the job, or when
            the total queue is full, and with L{TooManyRequests} when the user's queue is
            full; later with L{Unavailable} on a queue timeout or when the pool changes so
            that nothing serves the job any more. Cancelling it while queued removes the
            request; the backend never sees it.
        """
        if self._stopped:
            return fail(self._shuttingDown())
        user = self._users.get(job.user)
        blocked = self._blockedFor(job, user)
        if blocked is not None:
            return fail(blocked)
        reach = self._reach(job.kinds, job.model, frozenset())
        if reach == _NONE:
            return fail(self._noBackend(job))
        if user is not None:
            limit = user.maxQueued or self._config.maxQueuedPerUser
            if user.queued >= limit:
                return fail(
                    TooManyRequests(
                        f"too many queued requests for user {job.user} (limit {limit})",
                        code="user_queue_full",
                        retryAfter=self._userRetryAfter(job),
                    )
                )
        peerLimit = self._config.maxQueuedPerPeer
        if job.peer is not None and self._peerQueued.get(job.peer, 0) >= peerLimit:
            # One client address cannot take more of the queue by making up user ids.
            return fail(
                TooManyRequests(
                    f"too many queued requests from {job.peer} (limit {peerLimit})",
                    code="peer_queue_full",
                    retryAfter=self._userRetryAfter(job),
                )
            )
        if self._queued >= self._config.maxQueuedTotal:
            return fail(
                Unavailable(
                    "the proxy's queue is full",
                    code="queue_full",
                    retryAfter=self._config.healthInterval,
                )
            )
        if self._queuedBytes + job.size > self._config.maxQueuedBytes:
            return fail(
                Unavailable(
                    "the proxy holds as many queued request bodies as it may",
                    code="queue_bytes_full",
                    retryAfter=self._config.healthInterval,
                )
            )
        if user is None:
            # Created only once admitted, so refused strangers leave no state behind.
            if len(self._users) >= self._config.maxUsers:
                self._forgetLeastRecent()
            user = self._users[job.user] = _User(
                id=job.user, maxRunning=self._config.maxRunningPerUser
            )
        seq = next(self._seq)
        ticket = _Ticket(
            job=job,
            user=user,
            seq=seq,
            excluded=frozenset(),
            queuedSince=self._clock.seconds(),
            id=job.requestId or f"q{seq}",
        )
        self._admit(ticket)
        if reach == _SOON:
            # It waits for a backend to come back: its grace must end in time.
            self._armGrace(ticket.queuedSince)
        self._emit(
            "request.queued",
            {"id": ticket.id, "user": job.user, "model": job.model, "peer": job.peer,
             "queued": user.queued},
        )
        self._run()
        assert ticket.deferred is not None
        return ticket.deferred

    def setPolicy(
        self, user: str, priority: str | None = None, weight: float | None = None
    ) -> None:
        """
        Change a user's priority and/or weight from now on. The user is remembered (not
        forgotten when idle) from then on.

        A weight change applies to later dispatches. A tier change carries the user's lead
        over the old tier's virtual time into the new tier, so a promotion neither banks
        the old tier's backlog nor starts behind the new one's.

        @raise ValueError: for an unknown priority or a weight that is not positive.
        """
        if priority is not None and priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        if weight is not None and not weight > 0:
            raise ValueError(f"weight must be positive, got {weight!r}")
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _User(id=user, maxRunning=self._config.maxRunningPerUser)
        state.policySet = True
        if weight is not None:
            state.weight = float(weight)
        if priority is not None and priority != state.priority:
            oldTier = state.tier
            state.priority = priority
            if state.tier != oldTier:
                lead = max(0.0, state.counter - self._tierStart[oldTier])
                state.counter = self._tierStart[state.tier] + lead
                self._reindexUser(state)

    def snapshot(self) -> list[dict]:
        """
        One entry per configured, policy-holding or recently active user, by id:
        C{{"id", "priority", "weight", "max_queued", "blocked", "queued", "active",
        "served"}}; C{max_queued} is L{None} for the server-wide limit; C{weight} is the
        configured weight (C{boost} doubles it on top), C{served} counts dispatched
        requests (a retried request counts once).
        """
        return [self._describe(u) for u in sorted(self._users.values(), key=lambda u: u.id)]

    def queuedByBackend(self) -> dict[str, int]:
        """
        For each backend (by name), how many queued requests it could serve (a request
        that several backends serve counts for each). For metrics, read at scrape time:
        O(users x classes).
        """
        counts = {b.name: 0 for b in self._pool.backends}
        perClass: dict[tuple, int] = {}
        for user in self._users.values():
            for key, queue in user.queues.items():
                if queue.live:
                    perClass[key] = perClass.get(key, 0) + queue.live
        for key, count in perClass.items():
            cls = self._classes.get(key)
            if cls is None:
                continue
            for backend in self._pool.backends:
                if cls.servedBy(backend):
                    counts[backend.name] += count
        return counts

    def queuedFor(self, user: str) -> list[dict]:
        """
        One user's queued requests as in L{queuedRequests} (positions among everyone's),
        each with C{"estimated_start"}: seconds from now until it should start, the
        requests ahead of it divided by the slots of the available backends that have its
        model, times the mean lease duration so far; L{None} while no such backend is
        available.
        """
        mean = self._meanLease if self._meanLease is not None else DEFAULT_ESTIMATE
        found = self.queuedRequests(user)
        for entry in found:
            model = entry["model"]
            slots = sum(b.slots for b in self._pool.backends
                        if b.available and (model is None or model in b.models))
            entry["estimated_start"] = ((entry["position"] - 1) // slots) * mean if slots else None
        return found

    def stop(self) -> None:
        """
        Refuse new work with L{Unavailable} C{"shutting down"} and fail every queued
        request the same way. Running requests keep their leases until released.
        """
        if self._stopped:
            return
        self._stopped = True
        for cls in list(self._classes.values()):
            self._failClass(cls, self._shuttingDown)
        for call in (self._deadlineCall, self._idleCall, self._graceCall):
            if call is not None and call.active():
                call.cancel()
        self._deadlineCall = self._idleCall = self._graceCall = None
        self._deadlines.clear()
        self._idle.clear()
        self._run()

    # --- control plane ---

    def subscribe(self, listener: Callable[[str, dict], None]) -> None:
        """
        Call C{listener(name, payload)} for every request event: C{request.queued},
        C{request.started}, C{request.finished}, C{request.cancelled}, with the payloads
        documented in L{ollamamq.control.amp}. A listener must not call back into the
        scheduler.
        """
        self._listeners.append(listener)

    def user(self, user: str) -> dict | None:
        """
        One user's entry as in L{snapshot}, or L{None} for a user the scheduler does not
        know.
        """
        state = self._users.get(user)
        return None if state is None else self._describe(state)

    def setMaxQueued(self, user: str, maxQueued: int | None) -> None:
        """
        Set a user's queue limit (L{None}: the server-wide C{max_queued_per_user}). Already
        queued requests stay; the limit applies to the next admission. The user is
        remembered from then on, as with L{setPolicy}.

        @raise ValueError: for a limit that is not a positive integer.
        """
        if maxQueued is not None and (
            isinstance(maxQueued, bool) or not isinstance(maxQueued, int) or maxQueued < 1
        ):
            raise ValueError(f"max_queued must be a positive integer, got {maxQueued!r}")
        state = self._userFor(user)
        state.policySet = True
        state.maxQueued = maxQueued

    def setBlocked(self, user: str, blocked: bool) -> None:
        """
        Block or unblock a user. A blocked user's new requests are refused with
        L{Forbidden} and its queued ones fail with it at once; running requests finish.
        """
        state = self._userFor(user)
        state.policySet = True
        if blocked == state.blocked:
            return
        state.blocked = blocked
        if blocked:
            error = self._blockedFor(Job(user=user, kinds=()), state)
            assert error is not None
            for queue in list(state.queues.values()):
                for ticket in list(queue.tickets):
                    if ticket.state == _QUEUED:
                        self._fail(ticket, error, reason="blocked")
            self._run()

    def resetPolicy(
        self,
        user: str,
        priority: str = "normal",
        weight: float = 1.0,
        maxQueued: int | None = None,
    ) -> None:
        """
        Drop a user's runtime policy: set the given values (the config's, or the
        defaults), unblock it, and let it be forgotten once idle again unless it is
        configured.

        @raise ValueError: as L{setPolicy} and L{setMaxQueued}.
        """
        self.setPolicy(user, priority=priority, weight=weight)
        self.setMaxQueued(user, maxQueued)
        self.setBlocked(user, False)
        state = self._users[user]
        state.policySet = False
        self._maybeIdle(state)

    def blockNetwork(self, network: IPNetwork) -> None:
        """
        Refuse requests whose peer address lies in C{network} with L{Forbidden}; queued
        ones fail with it at once.
        """
        self._networks.add(network)
        key = (network.version, network.prefixlen)
        self._blockedNets.setdefault(key, set()).add(int(network.network_address))
        # One pass over the queue: an operator action, not a per-request cost.
        for state in list(self._users.values()):
            for queue in list(state.queues.values()):
                for ticket in list(queue.tickets):
                    peer = ticket.job.peer
                    if ticket.state == _QUEUED and peer is not None and self._peerBlocked(peer):
                        error = self._blockedFor(ticket.job, None)
                        assert error is not None
                        self._fail(ticket, error, reason="blocked")
        self._run()

    def unblockNetwork(self, network: IPNetwork) -> bool:
        """
        Lift a block made with L{blockNetwork}.

        @return: whether it was blocked.
        """
        if network not in self._networks:
            return False
        self._networks.discard(network)
        key = (network.version, network.prefixlen)
        networks = self._blockedNets[key]
        networks.discard(int(network.network_address))
        if not networks:
            del self._blockedNets[key]
        return True

    def blockedNetworks(self) -> list[IPNetwork]:
        """
        The blocked networks, sorted (IPv4 first).
        """
        return sorted(
            self._networks,
            key=lambda n: (n.version, n.network_address, n.prefixlen),
        )

    def queuedRequests(self, user: str | None = None, limit: int | None = None) -> list[dict]:
        """
        The queued requests in predicted dispatch order: C{{"id", "position", "user",
        "model", "waited", "peer"}}, C{position} 1 going next.

        The prediction plays fair queuing forward as if every request could take the next
        free slot: VIP first; within a tier by the start counter each request will have
        (the user's counter plus the charges of its earlier requests), then by arrival.
        Requests for a model with no free backend wait while others pass them, so the
        real order can differ across models; within one model and tier it is exact.

        Each user's requests are already in that order, so the users' sequences are
        merged lazily: the first C{limit} rows cost O(limit log U + U), not a sort of the
        whole queue.

        @param user: only this user's requests (positions still count everyone's).
        @param limit: at most this many rows (the first ones).
        """
        now = self._clock.seconds()
        result: list[dict] = []
        if limit is not None and limit <= 0:
            return result
        sequences = [self._predicted(state) for state in self._users.values() if state.queued]
        for position, (_, _, _, ticket) in enumerate(heapq.merge(*sequences), 1):
            job = ticket.job
            if user is not None and job.user != user:
                continue
            result.append(
                {
                    "id": ticket.id,
                    "position": position,
                    "user": job.user,
                    "model": job.model,
                    "waited": ticket.waitedBefore + (now - ticket.queuedSince),
                    "peer": job.peer,
                }
            )
            if limit is not None and len(result) >= limit:
                break
        return result

    def _predicted(self, state: _User) -> Iterator[tuple[int, float, int, _Ticket]]:
        """
        A user's queued tickets in arrival order, each with its predicted start:
        C{(tier, start counter, seq, ticket)}, increasing.
        """
        tier = state.tier
        counter = state.counter
        weight = state.effectiveWeight
        queues = [
            ((t.seq, t) for t in q.tickets if t.state == _QUEUED) for q in state.queues.values()
        ]
        for seq, ticket in heapq.merge(*queues, key=lambda e: e[0]):
            yield (tier, counter, seq, ticket)
            cost = self._estimate(state, ticket.job.model) if self._timeShare else REQUEST_COST
            counter += cost / weight

    def cancelQueued(self, requestId: str, error: Exception | None = None) -> bool:
        """
        Take a queued request out of the queue; its Deferred errbacks with C{error}
        (default: L{Unavailable} C{"cancelled by an operator"}).

        @return: whether a queued request had that id.
        """
        ticket = self._byId.get(requestId)
        if ticket is None or ticket.state != _QUEUED:
            return False
        if error is None:
            error = Unavailable(
                "the request was cancelled by an operator",
                code="cancelled",
                retryAfter=self._config.healthInterval,
            )
        self._fail(ticket, error, reason="operator")
        self._run()
        return True

    def reconfigure(self, config: Config) -> None:
        """
        Apply a reloaded config: limits and timeouts from now on, and the configured users'
        policies (the caller re-applies runtime overrides on top). Queues, counters and
        leases are kept. Users no longer in the config keep their state and may be
        forgotten once idle.

        @raise ValueError: for a C{fairShare} that is not one of L{FAIR_SHARES}.
        """
        if config.fairShare not in FAIR_SHARES:
            raise ValueError(
                f"fairShare must be one of {', '.join(FAIR_SHARES)}, got {config.fairShare!r}"
            )
        old = self._config
        self._config = config
        self._timeShare = config.fairShare == "time"
        for userID, userConfig in config.users.items():
            state = self._userFor(userID)
            policySet = state.policySet
            self.setPolicy(userID, priority=userConfig.priority, weight=userConfig.weight)
            self.setMaxQueued(userID, userConfig.maxQueued)
            state.policySet = policySet
            state.configured = True
        for userID in old.users:
            if userID not in config.users:
                state = self._users.get(userID)
                if state is not None:
                    state.configured = False
                    self._maybeIdle(state)
        self._applyMaxRunning()
        self._run()

    def _userFor(self, user: str) -> _User:
        """
        The state of C{user}, created when needed.
        """
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _User(id=user, maxRunning=self._config.maxRunningPerUser)
        return state

    def _applyMaxRunning(self) -> None:
        """
        Give every user the C{maxRunning} of the current config (their own, else the
        server-wide one); users it uncaps compete again at once.
        """
        for state in self._users.values():
            own = self._config.users.get(state.id)
            limit = own.maxRunning if own is not None else None
            state.maxRunning = limit if limit is not None else self._config.maxRunningPerUser
            if state in self._capped and not state.capped:
                self._capped.discard(state)
                self._reindexUser(state)

    def _describe(self, u: _User) -> dict:
        """
        A user's entry in L{snapshot}.
        """
        return {
            "id": u.id,
            "priority": u.priority,
            "weight": u.weight,
            "max_queued": u.maxQueued,
            "blocked": u.blocked,
            "queued": u.queued,
            "active": u.active,
            "served": u.served,
        }

    # --- errors ---

    def _shuttingDown(self) -> Unavailable:
        """
        The error for work refused because the proxy is stopping.
        """
        return Unavailable(
            "shutting down", code="shutting_down", retryAfter=self._config.healthInterval
        )

    def _noBackend(self, job: Job) -> Unavailable:
        """
        The error for a job no available backend serves.
        """
        what = f"model {job.model}" if job.model is not None else "this API"
        return Unavailable(
            f"no backend online for {what}",
            code="no_backend",
            retryAfter=self._config.healthInterval,
        )

    def _noOtherBackend(self, job: Job) -> BadGateway:
        """
        The error for a retried job that no untried available backend serves.
        """
        what = f"model {job.model}" if job.model is not None else "this request"
        return BadGateway(
            f"the backend failed and no other backend is available for {what}",
            code="backend_failed",
        )

    def _userRetryAfter(self, job: Job) -> float:
        """
        Seconds until the user's next dispatch under fair share (see the module docstring).
        """
        slots = sum(
            b.slots for b in self._pool.backends if b.available and b.serves(job.kinds, job.model)
        )
        mean = self._meanLease if self._meanLease is not None else 1.0
        return max(1.0, mean * max(1, self._backlogged) / max(1, slots))

    # --- queueing ---

    def _classFor(self, key: tuple) -> _Class:
        """
        The class with key C{key}, created when needed.
        """
        cls = self._classes.get(key)
        if cls is None:
            kinds, model, excluded = key
            cls = self._classes[key] = _Class(key, kinds, model, excluded)
            self._byModel.setdefault(model, {})[key] = cls
        return cls

    def _dropClass(self, cls: _Class) -> None:
        """
        Forget a class nobody has requests in.
        """
        if self._classes.get(cls.key) is cls:
            del self._classes[cls.key]
            byModel = self._byModel[cls.model]
            del byModel[cls.key]
            if not byModel:
                del self._byModel[cls.model]

    def _virtualTime(self, key: tuple, tier: int) -> float:
        """
        Where a user who becomes backlogged with a request of class C{key} starts at the
        earliest (see the module docstring).
        """
        cls = self._classes.get(key)
        top = self._peek(cls, tier) if cls is not None else None
        if top is None:
            return self._tierStart[tier]
        kinds, model, _ = key
        start = self._lastStart.get((kinds, model), [None, None])[tier]
        if start is None:
            start = self._tierStart[tier]
        return min(top[0], start)

    def _admit(self, ticket: _Ticket) -> None:
        """
        Put a ticket into its user's queue for its class and arm its timeout.
        """
        user = ticket.user
        job = ticket.job
        key = _classKey(job.kinds, job.model, ticket.excluded)
        if user.queued == 0:
            # Becoming backlogged: idle time banks no credit.
            user.counter = max(user.counter, self._virtualTime(key, user.tier))
            self._backlogged += 1
        queue = user.queues.get(key)
        isNew = queue is None
        if queue is None:
            cls = self._classFor(key)
            queue = user.queues[key] = _Queue(user, cls)
            cls.members += 1
        oldHead = queue.head()
        queue.insert(ticket)
        user.queued += 1
        self._queued += 1
        self._byId[ticket.id] = ticket
        self._hold(job, 1)
        ticket.deferred = Deferred(lambda d: self._cancel(ticket))
        if isNew or (oldHead is not None and ticket.seq < oldHead.seq):
            # New queue, or a retried request now heads it: its key went down.
            self._index(queue)
        timeout = self._config.queueTimeout
        if timeout is not None:
            deadlines = self._deadlines
            deadlines.append((ticket.queuedSince + timeout, ticket))
            if len(deadlines) > 2 * self._queued + 64:
                # Mostly served or cancelled tickets: keep memory proportional to the queue.
                self._deadlines = deque(e for e in deadlines if e[1].state == _QUEUED)
            self._armDeadlines()

    def _index(self, queue: _Queue) -> None:
        """
        Push a fresh heap entry for C{queue}, replacing its current one.
        """
        head = queue.head()
        if head is None:
            self._dropQueue(queue)
            return
        user = queue.user
        if user.capped:
            # Parked: re-pushed when one of the user's leases ends (see _endLease).
            queue.entry = None
            self._capped.add(user)
            return
        cls = queue.cls
        entry = (user.counter, head.seq, next(self._pushes), queue)
        queue.entry = entry
        heap = cls.heaps[user.tier]
        heapq.heappush(heap, entry)
        if len(cls.heaps[VIP]) + len(cls.heaps[NORMAL]) > 2 * cls.members + 16:
            # Too many dead entries: rebuild with the valid ones only.
            for h in cls.heaps:
                h[:] = [e for e in h if e[3].entry is e]
                heapq.heapify(h)

    def _reindexUser(self, user: _User) -> None:
        """
        Re-push all of a user's entries after its key went down (refund, tier change).
        """
        for queue in list(user.queues.values()):
            self._index(queue)

    def _dropQueue(self, queue: _Queue) -> None:
        """
        Remove an empty queue (and its class, when that was the class's last queue).
        """
        queue.entry = None
        user = queue.user
        cls = queue.cls
        if user.queues.get(cls.key) is queue:
            del user.queues[cls.key]
            cls.members -= 1
            if cls.members == 0:
                self._dropClass(cls)

    def _peek(self, cls: _Class, tier: int) -> tuple | None:
        """
        The valid, up-to-date entry with the lowest key in one of C{cls}'s heaps, fixing
        and dropping stale entries on the way.
        """
        heap = cls.heaps[tier]
        while heap:
            entry = heap[0]
            queue = entry[3]
            if queue.entry is not entry:
                heapq.heappop(heap)
                continue
            head = queue.head()
            if head is None:
                heapq.heappop(heap)
                self._dropQueue(queue)
                continue
            if queue.user.capped:
                # At its maxRunning: parked until one of its leases ends (see _endLease).
                heapq.heappop(heap)
                queue.entry = None
                self._capped.add(queue.user)
                continue
            counter = queue.user.counter
            if entry[0] != counter or entry[1] != head.seq:
                # A lower bound gone stale (the user was served elsewhere, or its head was
                # cancelled): re-push with the real key.
                fresh = (counter, head.seq, next(self._pushes), queue)
                queue.entry = fresh
                heapq.heapreplace(heap, fresh)
                continue
            return entry
        return None

    def _unqueue(self, ticket: _Ticket, state: str) -> None:
        """
        Take a queued ticket out of the counts (its queue drops it lazily).
        """
        ticket.state = state
        if self._byId.get(ticket.id) is ticket:
            del self._byId[ticket.id]
        user = ticket.user
        job = ticket.job
        queue = user.queues.get(_classKey(job.kinds, job.model, ticket.excluded))
        if queue is not None:
            queue.live -= 1
            if queue.live == 0:
                self._dropQueue(queue)
            else:
                queue.compact()
        user.queued -= 1
        self._queued -= 1
        self._hold(job, -1)
        if user.queued == 0:
            self._backlogged -= 1
        self._maybeIdle(user)

    def _cancel(self, ticket: _Ticket) -> None:
        """
        The canceller of a ticket's Deferred: the client went away. Deferred.cancel then
        errbacks it with CancelledError, which its caller handles.
        """
        if ticket.state == _QUEUED:
            self._unqueue(ticket, _CANCELLED)
            self._emitCancelled(ticket, "client")
        elif ticket.state == _GRANTED and ticket.lease is not None:
            lease = ticket.lease
            if lease._finished:
                return
            # Granted but not delivered yet (cancelled from another callback of the same
            # dispatch round): the backend never saw it, so give the slot back uncharged.
            user = self._endLease(lease)
            self._refund(user, lease)
            self._maybeIdle(user)
            self._run()

    def _fail(self, ticket: _Ticket, error: Exception, reason: str = "failed") -> None:
        """
        Take a queued ticket out and errback it once the state is consistent.

        @param reason: why, for the C{request.cancelled} event (see
            L{ollamamq.control.amp}).
        """
        self._unqueue(ticket, _FAILED)
        assert ticket.deferred is not None
        self._outbox.append((ticket.deferred, error))
        self._emitCancelled(ticket, reason)

    def _emitCancelled(self, ticket: _Ticket, reason: str) -> None:
        """
        Tell the listeners a queued request left the queue without a slot.
        """
        job = ticket.job
        self._emit(
            "request.cancelled",
            {"id": ticket.id, "user": job.user, "model": job.model, "reason": reason},
        )

    def _emit(self, name: str, payload: dict) -> None:
        """
        Call every listener with an event. Listeners only record it (they must not call
        back into the scheduler), so this is safe in the middle of a dispatch.
        """
        for listener in self._listeners:
            listener(name, payload)

    def _blockedFor(self, job: Job, user: _User | None) -> Forbidden | None:
        """
        The error for a job whose user or address is blocked, else L{None}.
        """
        if user is not None and user.blocked:
            return Forbidden(f"user {job.user} is blocked", code="user_blocked")
        if self._blockedNets and job.peer is not None and self._peerBlocked(job.peer):
            return Forbidden(f"address {job.peer} is blocked", code="address_blocked")
        return None

    def _peerBlocked(self, peer: str) -> bool:
        """
        Whether C{peer} lies in a blocked network: one set lookup per blocked prefix
        length, whatever the number of blocks.
        """
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        version = address.version
        bits = address.max_prefixlen
        value = int(address)
        # Integer masks, not ipaddress objects: a few operations per blocked prefix length.
        for (netVersion, length), networks in self._blockedNets.items():
            if netVersion == version and (value >> (bits - length)) << (bits - length) in networks:
                return True
        return False

    def _failClass(self, cls: _Class, error: Callable[[], Exception]) -> None:
        """
        Fail every queued request of a class; C{error} makes the exception.
        """
        queues = [e[3] for heap in cls.heaps for e in heap if e[3].entry is e]
        for user in self._capped:
            parked = user.queues.get(cls.key)
            if parked is not None and parked.entry is None:
                queues.append(parked)
        for queue in queues:
            for ticket in list(queue.tickets):
                if ticket.state == _QUEUED:
                    self._fail(ticket, error())
        self._dropClass(cls)

    # --- dispatch ---

    def _run(self) -> None:
        """
        Dispatch while slots and requests allow, then fire the Deferreds; loop while
        callbacks re-entered with more work.
        """
        if self._running:
            self._again = True
            return
        self._running = True
        try:
            while True:
                self._again = False
                if not self._stopped:
                    while self._grantOne():
                        pass
                while self._outbox:
                    d, result = self._outbox.popleft()
                    if d.called:
                        # Cancelled between the decision and now (see _cancel).
                        continue
                    if isinstance(result, Lease):
                        d.callback(result)
                    else:
                        d.errback(result)
                if not self._again:
                    break
        finally:
            self._running = False

    def _candidateClasses(self, free: list[Backend]) -> Iterator[_Class]:
        """
        The classes with queued requests that one of the C{free} backends can serve.
        """
        classes = self._classes
        seen: set[tuple] = set()
        for backend in free:
            if len(classes) <= len(backend.models) + 1:
                pool: Iterator[_Class] = iter(list(classes.values()))
            else:
                pool = itertools.chain.from_iterable(
                    list(self._byModel.get(m, {}).values())
                    for m in itertools.chain((None,), backend.models)
                )
            for cls in pool:
                if cls.key not in seen and cls.servedBy(backend):
                    seen.add(cls.key)
                    yield cls

    def _grantOne(self) -> bool:
        """
        Make one dispatch decision.

        @return: whether a request was granted a slot.
        """
        if not self._queued:
            return False
        free = [b for b in self._pool.backends if b.available and b.free > 0]
        if not free:
            return False
        candidates = list(self._candidateClasses(free))
        best = None
        for tier in (VIP, NORMAL):
            for cls in candidates:
                entry = self._peek(cls, tier)
                if entry is not None and (best is None or entry < best):
                    best = entry
            if best is not None:
                break
        if best is None:
            return False
        queue: _Queue = best[3]
        ticket = queue.head()
        assert ticket is not None
        job = ticket.job
        backend = self._pool.choose(job.kinds, job.model, exclude=ticket.excluded)
        # The class is served by a free backend, which is what choose() looks for.
        assert backend is not None, "pool.choose disagrees with a free backend"
        user = queue.user
        queue.tickets.popleft()
        ticket.state = _GRANTED
        if self._byId.get(ticket.id) is ticket:
            del self._byId[ticket.id]
        queue.live -= 1
        if queue.live == 0:
            self._dropQueue(queue)
        user.queued -= 1
        self._queued -= 1
        self._hold(job, -1)
        if user.queued == 0:
            self._backlogged -= 1
        tier = user.tier
        start = user.counter
        self._lastStart.setdefault((job.kinds, job.model), [None, None])[tier] = start
        self._tierStart[tier] = start
        weight = user.effectiveWeight
        if self._timeShare:
            charge = self._estimate(user, job.model) / weight
        else:
            charge = REQUEST_COST / weight
        user.counter = start + charge
        user.served += 1
        user.active += 1
        self._active += 1
        self._pool.acquire(backend)
        now = self._clock.seconds()
        lease = Lease(
            backend=backend,
            job=job,
            waited=ticket.waitedBefore + (now - ticket.queuedSince),
            scheduler=self,
            ticket=ticket,
            charge=charge,
            grantedAt=now,
            weight=weight,
        )
        ticket.lease = lease
        assert ticket.deferred is not None
        self._outbox.append((ticket.deferred, lease))
        self._emit(
            "request.started",
            {"id": ticket.id, "user": job.user, "model": job.model, "backend": backend.name,
             "waited": lease.waited},
        )
        return True

    # --- leases ---

    def _endLease(self, lease: Lease) -> _User:
        """
        Give a lease's slot back and take it out of the counts.
        """
        lease._finished = True
        self._pool.release(lease.backend)
        user = lease._ticket.user
        user.active -= 1
        self._active -= 1
        if user in self._capped and not user.capped:
            # Below its maxRunning again: its parked queues compete from now on.
            self._capped.discard(user)
            self._reindexUser(user)
        return user

    def _refund(self, user: _User, lease: Lease) -> None:
        """
        Undo a lease's charge: its request got no service.
        """
        user.served -= 1
        user.counter -= lease._charge
        # The user's key went down: its heap entries must not stay above it.
        self._reindexUser(user)

    def _release(self, lease: Lease) -> None:
        """
        See L{Lease.release}.
        """
        if lease._finished:
            return
        user = self._endLease(lease)
        duration = self._clock.seconds() - lease._grantedAt
        job = lease.job
        self._emit(
            "request.finished",
            {"id": lease._ticket.id, "user": job.user, "model": job.model,
             "backend": lease.backend.name, "duration": duration},
        )
        if self._meanLease is None:
            self._meanLease = duration
        else:
            self._meanLease += _LEASE_SMOOTHING * (duration - self._meanLease)
        if self._timeShare:
            self._correct(user, lease, duration)
        self._maybeIdle(user)
        self._run()

    def _estimate(self, user: _User, model: str | None) -> float:
        """
        How long C{user}'s next lease for C{model} is expected to last, in seconds (see the
        module docstring).
        """
        estimate = user.modelLease.get(model)
        if estimate is None:
            estimate = user.meanLease
            if estimate is None:
                estimate = self._meanLease
                if estimate is None:
                    estimate = DEFAULT_ESTIMATE
        return max(estimate, MIN_ESTIMATE)

    def _correct(self, user: _User, lease: Lease, duration: float) -> None:
        """
        Charge a released lease its actual duration instead of the estimate charged at
        dispatch, and learn from it.
        """
        model = lease.job.model
        mean = user.modelLease.get(model)
        user.modelLease[model] = (
            duration if mean is None else mean + _LEASE_SMOOTHING * (duration - mean)
        )
        mean = user.meanLease
        user.meanLease = duration if mean is None else mean + _LEASE_SMOOTHING * (duration - mean)
        correction = duration / lease._weight - lease._charge
        if correction:
            user.counter += correction
            if correction < 0:
                # The key went down: its heap entries must not stay above it. (Going up,
                # they are lower bounds, fixed when they reach the top.)
                self._reindexUser(user)

    def _retry(self, lease: Lease, exclude: bool) -> Deferred[Lease]:
        """
        See L{Lease.retry}.
        """
        if lease._finished:
            raise RuntimeError("the lease was already released or retried")
        user = self._endLease(lease)
        old = lease._ticket
        job = old.job
        self._refund(user, lease)
        excluded = old.excluded
        reach = _NONE
        if exclude:
            others = excluded | {lease.backend}
            reach = self._reach(job.kinds, job.model, others)
            if reach != _NONE:
                excluded = others
        if reach == _NONE:
            reach = self._reach(job.kinds, job.model, excluded)
        error: Exception | None = None
        if self._stopped:
            error = self._shuttingDown()
        elif reach == _NONE:
            error = self._noOtherBackend(job) if excluded else self._noBackend(job)
        if error is not None:
            self._maybeIdle(user)
            self._run()
            return fail(error)
        ticket = _Ticket(
            job=job,
            user=user,
            seq=old.seq,
            excluded=excluded,
            queuedSince=self._clock.seconds(),
            waitedBefore=lease.waited,
            id=old.id,
        )
        self._admit(ticket)
        if reach == _SOON:
            self._armGrace(ticket.queuedSince)
        self._run()
        assert ticket.deferred is not None
        return ticket.deferred

    # --- pool changes ---

    def _poolChanged(self) -> None:
        """
        The pool changed: fail the requests nothing serves any more, then dispatch (a
        backend may have come online, been added or undrained).
        """
        if self._stopped:
            return
        now = self._clock.seconds()
        for cls in list(self._classes.values()):
            if self._reach(cls.kinds, cls.model, cls.excluded, now) != _NONE:
                continue
            job = Job(user="", kinds=cls.kinds, model=cls.model)
            # A retried request lost its last untried backend: that is the backend
            # failure surfacing (502); anything else is "come back later" (503).
            makeError: Callable[[Job], Exception] = (
                self._noOtherBackend if cls.excluded else self._noBackend
            )
            self._failClass(cls, functools.partial(makeError, job))
        self._armGrace(now)
        self._run()

    def _downGrace(self) -> float:
        """
        How long requests wait for an unavailable backend to come back.
        """
        grace = self._config.downGrace
        return grace if grace is not None else 3 * self._config.healthInterval

    def _reach(
        self,
        kinds: frozenset[str],
        model: str | None,
        excluded: frozenset[Backend],
        now: float | None = None,
    ) -> int:
        """
        Whether a request with these needs can be served: L{_NOW} when a backend it has not
        tried serves it and is available, L{_SOON} when the only such backends are busy
        for a while or unavailable for less than the grace (L{Backend.recovering}), so it
        should wait, else L{_NONE}. Stops at the first available backend.
        """
        reach = _NONE
        grace = None
        for b in self._pool.backends:
            if not b.serves(kinds, model) or b in excluded:
                continue
            if b.available:
                return _NOW
            if reach == _NONE:
                if grace is None:
                    grace = self._downGrace()
                    if now is None:
                        now = self._clock.seconds()
                if b.recovering(now, grace):
                    reach = _SOON
        return reach

    def _armGrace(self, now: float) -> None:
        """
        Make sure the pool is looked at again when the next unavailable backend's grace
        ends, so the requests waiting only for it then get their error.
        """
        grace = self._downGrace()
        ends = [
            b.unavailableSince + grace
            for b in self._pool.backends
            if b.state != ONLINE and not b.draining and b.unavailableSince is not None
            and b.unavailableSince + grace > now
        ]
        call = self._graceCall
        if call is not None and call.active():
            if ends and abs(call.getTime() - min(ends)) < _EPSILON:
                return
            call.cancel()
        self._graceCall = None
        if ends and self._classes:
            self._graceCall = self._clock.callLater(min(ends) - now + _EPSILON,
                                                    self._poolChanged)

    # --- timers ---

    def _armDeadlines(self) -> None:
        """
        Make sure one timer runs for the oldest queue deadline.
        """
        if self._deadlineCall is None and self._deadlines:
            delay = max(0.0, self._deadlines[0][0] - self._clock.seconds())
            self._deadlineCall = self._clock.callLater(delay, self._expireDeadlines)

    def _expireDeadlines(self) -> None:
        """
        Fail the requests queued longer than C{queueTimeout}.
        """
        self._deadlineCall = None
        now = self._clock.seconds()
        while self._deadlines and self._deadlines[0][0] <= now + _EPSILON:
            _, ticket = self._deadlines.popleft()
            if ticket.state == _QUEUED:
                self._fail(
                    ticket,
                    Unavailable(
                        f"no backend slot within {self._config.queueTimeout:g} seconds",
                        code="queue_timeout",
                        retryAfter=self._config.healthInterval,
                    ),
                )
        self._armDeadlines()
        self._run()

    def _hold(self, job: Job, sign: int) -> None:
        """
        Count a job in (C{sign} 1) or out of (-1) the queued totals kept per client
        address and in body bytes.
        """
        self._queuedBytes += sign * job.size
        peer = job.peer
        if peer is not None:
            count = self._peerQueued.get(peer, 0) + sign
            if count:
                self._peerQueued[peer] = count
            else:
                del self._peerQueued[peer]

    def _forgetLeastRecent(self) -> None:
        """
        Make room for a new user when C{maxUsers} are tracked: forget the idle users that
        were active least recently (configured users, users with a policy and users with
        requests are never forgotten), so made-up user ids cannot grow memory.
        """
        forget = self._config.idleForget
        while self._idle and len(self._users) >= self._config.maxUsers:
            entry = heapq.heappop(self._idle)
            user = entry[2]
            user.idlePending = False
            if self._users.get(user.id) is not user or not self._idleEligible(user):
                continue
            if user.idleSince + forget > entry[0] + _EPSILON:
                # Active again since the entry was made: put it back at its real place.
                user.idlePending = True
                heapq.heappush(self._idle, (user.idleSince + forget, next(self._pushes), user))
                continue
            del self._users[user.id]

    def _idleEligible(self, user: _User) -> bool:
        """
        Whether C{user} may be forgotten once idle long enough.
        """
        return not (
            user.queued or user.active or user.configured or user.policySet or self._stopped
        )

    def _maybeIdle(self, user: _User) -> None:
        """
        Note that C{user} may have become idle: it is forgotten C{idleForget} seconds from
        now unless it becomes active again.

        One timer serves all users, and each user has at most one entry in the heap (a
        user that goes idle after every request only moves its C{idleSince}), so memory is
        bounded by the number of users, not by the request rate.
        """
        if not self._idleEligible(user):
            return
        now = self._clock.seconds()
        user.idleSince = now
        if not user.idlePending:
            user.idlePending = True
            # Never earlier than the entries already there (theirs are idleSince + F with
            # an older idleSince), so the timer armed for the top stays right.
            heapq.heappush(self._idle, (now + self._config.idleForget, next(self._pushes), user))
            if self._idleCall is None:
                self._idleCall = self._clock.callLater(self._config.idleForget, self._forgetIdle)

    def _forgetIdle(self) -> None:
        """
        Drop the state of users idle for C{idleForget} seconds (bounded memory); users that
        were active since their entry was made get a new one for their new idle time.
        """
        self._idleCall = None
        now = self._clock.seconds()
        forget = self._config.idleForget
        while self._idle and self._idle[0][0] <= now + _EPSILON:
            _, _, user = heapq.heappop(self._idle)
            user.idlePending = False
            if self._users.get(user.id) is not user or not self._idleEligible(user):
                continue
            if user.idleSince + forget <= now + _EPSILON:
                del self._users[user.id]
            else:
                user.idlePending = True
                heapq.heappush(self._idle, (user.idleSince + forget, next(self._pushes), user))
        if self._idle:
            delay = max(0.0, self._idle[0][0] - now)
            self._idleCall = self._clock.callLater(delay, self._forgetIdle)
