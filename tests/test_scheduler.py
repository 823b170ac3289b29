# -*- test-case-name: tests.test_scheduler -*-
"""
Tests for L{ollamamq.scheduler}: fair share, priorities, FIFO, admission, cancellation,
retries, pool changes, forgetting idle users and reentrancy, on real L{Backend}s in a
real L{BackendPool} and a L{task.Clock}.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import Counter
from collections.abc import Iterable, Mapping

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.backends import OLLAMA, OPENAI, Backend, BackendPool
from ollamamq.config import Config, UserConfig
from ollamamq.errors import BadGateway, TooManyRequests, Unavailable
from ollamamq.scheduler import Job, Lease, Scheduler

API = frozenset({OLLAMA})
V1 = frozenset({OLLAMA, OPENAI})


def onlineBackend(
    pool: BackendPool,
    name: str,
    slots: int = 1,
    models: Iterable[str] = ("m",),
    kind: str = OLLAMA,
) -> Backend:
    """
    Add a backend to C{pool} and mark it online with C{models}.
    """
    backend = pool.add(Backend(name=name, url=f"http://{name}", slots=slots))
    pool.markOnline(backend, kind, list(models))
    return backend


def job(user: str, model: str | None = "m:latest", kinds: frozenset[str] = API) -> Job:
    """
    A job for C{user}; C{"m:latest"} is the canonical key of the model C{"m"}.
    """
    return Job(user=user, kinds=kinds, model=model)



# Every property test: 300 fixed examples (derandomized, so CI runs the same ones each
# time), no per-example deadline on a loaded machine.
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

def effectiveWeight(users: Mapping[str, UserConfig], user: str) -> float:
    """
    A configured user's weight with boost applied (boost doubles it).
    """
    u = users[user]
    return u.weight * (2 if u.priority == "boost" else 1)


def isVIP(users: Mapping[str, UserConfig], user: str) -> bool:
    """
    Whether a configured user is a VIP.
    """
    return users[user].priority == "vip"

class Harness:
    """
    A scheduler on a pool and a clock, recording which requests were granted, in order.

    @ivar grants: C{(label, lease)} in the order leases were delivered.
    @ivar failures: label -> the Failure a request ended with.
    """

    def __init__(self, pool: BackendPool | None = None, **configFields: object) -> None:
        """
        @param pool: the pool to use (a new, empty one by default).
        @param configFields: L{Config} fields.
        """
        self.clock = task.Clock()
        self.pool = pool if pool is not None else BackendPool()
        self.config = Config(**configFields)  # type: ignore[arg-type]
        self.scheduler = Scheduler(self.pool, self.clock, self.config)
        self.grants: list[tuple[str, Lease]] = []
        self.failures: dict[str, Failure] = {}

    def submit(self, label: str, j: Job) -> Deferred[Lease]:
        """
        Enqueue C{j}, recording its outcome under C{label}.
        """
        d = self.scheduler.enqueue(j)
        self.track(label, d)
        return d

    def track(self, label: str, d: Deferred[Lease]) -> None:
        """
        Record the outcome of C{d} under C{label}.
        """

        def granted(lease: Lease) -> Lease:
            """
            Record a delivered lease.
            """
            self.grants.append((label, lease))
            return lease

        def failed(f: Failure) -> None:
            """
            Record (and handle) a failure.
            """
            self.failures[label] = f

        d.addCallbacks(granted, failed)

    def labels(self) -> list[str]:
        """
        The labels of the granted requests, in grant order.
        """
        return [label for label, _ in self.grants]

    def releaseNext(self) -> None:
        """
        Release the oldest lease still held.
        """
        for _, lease in self.grants:
            if not lease._finished:
                lease.release()
                return
        raise AssertionError("no lease held")

    def drain(self, count: int) -> None:
        """
        Release the oldest held lease C{count} times.
        """
        for _ in range(count):
            self.releaseNext()


class FairnessTests(SynchronousTestCase):
    """
    Who goes next under contention.
    """

    def setUp(self) -> None:
        """
        One backend with one slot.
        """
        self.h = Harness(
            users={
                "vip1": UserConfig(priority="vip"),
                "vip2": UserConfig(priority="vip"),
                "boosted": UserConfig(priority="boost"),
                "heavy": UserConfig(weight=3),
            },
            maxQueuedPerUser=1000,
        )
        self.backend = onlineBackend(self.h.pool, "b1")

    def test_newcomerServedNext(self) -> None:
        """
        With one slot, user A queues 8 requests and then user B queues 1: B's request is
        the second one dispatched, not the ninth.
        """
        for i in range(8):
            self.h.submit(f"a{i}", job("a"))
        self.h.submit("b0", job("b"))
        self.h.drain(8)
        self.assertEqual(self.h.labels()[:3], ["a0", "b0", "a1"])
        self.assertEqual(len(self.h.grants), 9)

    def test_newcomerAfterLongBacklog(self) -> None:
        """
        A user arriving after another has already been served 50 times is served next:
        idle time neither banks credit nor costs a place.
        """
        for i in range(100):
            self.h.submit(f"a{i}", job("a"))
        self.h.drain(50)
        self.h.submit("b0", job("b"))
        self.h.drain(2)
        self.assertEqual(self.h.labels()[50:53], ["a50", "b0", "a51"])

    def test_equalUsersAlternate(self) -> None:
        """
        Two users with equal policy and full queues take turns.
        """
        for i in range(5):
            self.h.submit(f"a{i}", job("a"))
        for i in range(5):
            self.h.submit(f"b{i}", job("b"))
        self.h.drain(9)
        self.assertEqual(
            self.h.labels(), ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
        )

    def test_vipJumpsAhead(self) -> None:
        """
        A VIP request goes before every queued non-VIP request, however old.
        """
        self.h.submit("a0", job("a"))
        for i in range(1, 5):
            self.h.submit(f"a{i}", job("a"))
            self.h.submit(f"b{i}", job("b"))
        self.h.submit("v0", job("vip1"))
        self.h.drain(1)
        self.assertEqual(self.h.labels(), ["a0", "v0"])

    def test_vipsAlternate(self) -> None:
        """
        VIPs share fairly among themselves, and all of them go before normal users.
        """
        self.h.submit("n0", job("n"))
        for i in range(3):
            self.h.submit(f"x{i}", job("vip1"))
        for i in range(3):
            self.h.submit(f"y{i}", job("vip2"))
        self.h.submit("n1", job("n"))
        self.h.drain(7)
        self.assertEqual(
            self.h.labels(), ["n0", "x0", "y0", "x1", "y1", "x2", "y2", "n1"]
        )

    def keepBacklogged(self, users: dict[str, int], dispatches: int) -> Counter[str]:
        """
        Keep every user in C{users} backlogged with C{users[u]} queued requests and run
        C{dispatches} dispatches through the one slot.

        @return: dispatches per user, after each step checked by C{check}.
        """
        counts: Counter[str] = Counter()
        self.prefixes: list[Counter[str]] = []

        def refill(lease: Lease) -> Lease:
            """
            Count a dispatch, hold its lease, and queue the user's next request.
            """
            counts[lease.job.user] += 1
            self.prefixes.append(Counter(counts))
            d = self.h.scheduler.enqueue(job(lease.job.user))
            d.addCallback(refill)
            self.held.append(lease)
            return lease

        self.held: list[Lease] = []
        for user, depth in users.items():
            for _ in range(depth):
                self.h.scheduler.enqueue(job(user)).addCallback(refill)
        while len(self.prefixes) < dispatches:
            self.held.pop(0).release()
        return counts

    def test_boostTwoToOne(self) -> None:
        """
        Under contention a C{boost} user gets two dispatches for each one of a normal user.
        """
        self.keepBacklogged({"boosted": 5, "plain": 5}, 300)
        for n, prefix in enumerate(self.prefixes, 1):
            self.assertLessEqual(abs(prefix["boosted"] - n * 2 / 3), 1.5, (n, prefix))
        self.assertEqual(self.prefixes[299]["boosted"], 200)

    def test_weightsOneToThree(self) -> None:
        """
        Weights 1 and 3 share 1:3 over 400 dispatches, and never drift more than one
        dispatch from the exact share at any point.
        """
        self.keepBacklogged({"plain": 5, "heavy": 5}, 400)
        for n, prefix in enumerate(self.prefixes, 1):
            self.assertLessEqual(abs(prefix["heavy"] - n * 3 / 4), 1, (n, prefix))
        self.assertEqual(self.prefixes[399], Counter({"heavy": 300, "plain": 100}))


class OrderTests(SynchronousTestCase):
    """
    Per-user FIFO, per model.
    """

    def test_fifoPerUser(self) -> None:
        """
        One user's requests are dispatched in the order they arrived.
        """
        h = Harness()
        onlineBackend(h.pool, "b1", slots=2)
        for i in range(10):
            h.submit(f"a{i}", job("a"))
        h.drain(8)
        self.assertEqual(h.labels(), [f"a{i}" for i in range(10)])

    def test_perModelIndependence(self) -> None:
        """
        A user's request for a model whose backend is busy does not hold up the same
        user's later request for a model with a free backend.
        """
        h = Harness()
        b1 = onlineBackend(h.pool, "b1", models=["m1"])
        b2 = onlineBackend(h.pool, "b2", models=["m2"])
        h.submit("other", job("other", "m1:latest"))
        h.submit("a-m1", job("a", "m1:latest"))
        h.submit("a-m2", job("a", "m2:latest"))
        self.assertEqual(h.labels(), ["other", "a-m2"])
        self.assertEqual((b1.active, b2.active), (1, 1))
        h.releaseNext()
        self.assertEqual(h.labels(), ["other", "a-m2", "a-m1"])

    def test_oldestFirstAmongServable(self) -> None:
        """
        When one free slot can serve several of a user's requests (here, for different
        models on one backend), the oldest goes first.
        """
        h = Harness()
        onlineBackend(h.pool, "b1", models=["m1", "m2"])
        h.submit("busy", job("x", "m1:latest"))
        h.submit("a-m2", job("a", "m2:latest"))
        h.submit("a-m1", job("a", "m1:latest"))
        h.drain(2)
        self.assertEqual(h.labels(), ["busy", "a-m2", "a-m1"])

    def test_manyClasses(self) -> None:
        """
        With more classes queued than a free backend has models, the backend finds the
        classes it serves through the per-model index, and still takes the lowest counter.
        """
        h = Harness()
        b1 = onlineBackend(h.pool, "b1", models=["m1"])
        onlineBackend(h.pool, "b2", models=["m2", "m3", "m4"])
        h.submit("busy1", job("x", "m1:latest"))
        h.submit("busy2", job("x", "m2:latest"))
        for model in ("m2", "m3", "m4"):
            h.submit(f"y-{model}", job("y", f"{model}:latest"))
        h.submit("a-m1", job("a", "m1:latest"))
        h.submit("x-m1", job("x", "m1:latest"))
        h.submit("y-m1", job("y", "m1:latest", V1))
        self.assertGreater(len(h.scheduler._classes), len(b1.models) + 1)
        h.grants[0][1].release()
        h.grants[-1][1].release()
        self.assertEqual(h.labels()[2:], ["a-m1", "y-m1"])

    def test_anyModelAndKinds(self) -> None:
        """
        A job without a model goes to any backend of a fitting kind; an C{/api/*} job never
        goes to an OpenAI-only backend.
        """
        h = Harness()
        openai = onlineBackend(h.pool, "oa", models=["m"], kind=OPENAI)
        h.submit("v1", job("a", None, V1))
        self.assertIs(h.grants[0][1].backend, openai)
        d = h.scheduler.enqueue(job("a", "m:latest", API))
        self.failureResultOf(d, Unavailable)

    def test_leaseRecordsWait(self) -> None:
        """
        A lease says how long its request was queued, in clock time.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.clock.advance(7)
        h.releaseNext()
        self.assertEqual([lease.waited for _, lease in h.grants], [0, 7])


class CancelTests(SynchronousTestCase):
    """
    A client that disconnects while queued leaves the queue at once.
    """

    def test_cancelWhileQueued(self) -> None:
        """
        A cancelled request is never given a slot, the counts drop at once, and nothing is
        logged.
        """
        h = Harness()
        b1 = onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        gone = h.scheduler.enqueue(job("a"))
        h.submit("a2", job("a"))
        self.assertEqual((h.scheduler.queued, h.scheduler.active), (2, 1))
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual((h.scheduler.queued, h.scheduler.active), (1, 1))
        self.assertEqual(h.scheduler.snapshot()[0]["queued"], 1)
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "a2"])
        self.assertEqual(b1.active, 1)
        h.releaseNext()
        self.assertEqual((h.scheduler.queued, h.scheduler.active, b1.active), (0, 0, 0))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cancelHeadOfOtherUser(self) -> None:
        """
        Cancelling a user's only request takes that user out of contention.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        b = h.scheduler.enqueue(job("b"))
        h.submit("c0", job("c"))
        b.cancel()
        self.failureResultOf(b, CancelledError)
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "c0"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_manyCancelsCompact(self) -> None:
        """
        A queue whose head never moves does not keep every cancelled request: memory stays
        proportional to what is queued.
        """
        h = Harness(maxQueuedPerUser=5)
        onlineBackend(h.pool, "b1", models=["m1", "m2"])
        h.submit("busy", job("x", "m1:latest"))
        h.submit("a-first", job("a", "m1:latest"))
        for _ in range(1000):
            d = h.scheduler.enqueue(job("a", "m1:latest"))
            d.cancel()
            self.failureResultOf(d, CancelledError)
        h.submit("a-last", job("a", "m1:latest"))
        queues = h.scheduler._users["a"].queues
        self.assertLessEqual(sum(len(q.tickets) for q in queues.values()), 20)
        h.drain(2)
        self.assertEqual(h.labels(), ["busy", "a-first", "a-last"])

    def test_cancelAfterGrantIsNoop(self) -> None:
        """
        Cancelling a Deferred that already delivered its lease changes nothing; the lease
        still has to be released.
        """
        h = Harness()
        b1 = onlineBackend(h.pool, "b1")
        d = h.scheduler.enqueue(job("a"))
        lease = self.successResultOf(d)
        d.cancel()
        self.assertEqual(b1.active, 1)
        lease.release()
        lease.release()
        self.assertEqual((b1.active, h.scheduler.active), (0, 0))


class AdmissionTests(SynchronousTestCase):
    """
    Immediate refusals: 429, 503 and shutdown; queue timeouts.
    """

    def test_userQueueFull(self) -> None:
        """
        Beyond C{maxQueuedPerUser} queued requests the user gets 429 with a Retry-After of
        at least a second; other users are unaffected.
        """
        h = Harness(maxQueuedPerUser=2)
        onlineBackend(h.pool, "b1")
        for i in range(3):
            h.submit(f"a{i}", job("a"))
        f = self.failureResultOf(h.scheduler.enqueue(job("a")), TooManyRequests)
        self.assertEqual(f.value.status, 429)
        self.assertGreaterEqual(f.value.retryAfter, 1)
        h.submit("b0", job("b"))
        self.assertNotIn("b0", h.failures)

    def test_userRetryAfterEstimate(self) -> None:
        """
        The 429 Retry-After grows with the mean lease duration and the number of
        backlogged users sharing the slots.
        """
        h = Harness(maxQueuedPerUser=1)
        onlineBackend(h.pool, "b1")
        h.submit("x", job("x"))
        h.clock.advance(10)
        h.releaseNext()
        h.submit("x2", job("x"))
        h.submit("a", job("a"))
        h.submit("b", job("b"))
        f = self.failureResultOf(h.scheduler.enqueue(job("a")), TooManyRequests)
        # Mean lease 10 s, two users backlogged, one slot.
        self.assertEqual(f.value.retryAfter, 20)

    def test_configuredUserLimit(self) -> None:
        """
        A configured user's C{max_queued} overrides the server-wide limit.
        """
        h = Harness(maxQueuedPerUser=10, users={"a": UserConfig(maxQueued=1)})
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        self.failureResultOf(h.scheduler.enqueue(job("a")), TooManyRequests)

    def test_totalQueueFull(self) -> None:
        """
        Beyond C{maxQueuedTotal} queued requests everyone gets 503 with a Retry-After.
        """
        h = Harness(maxQueuedTotal=2, healthInterval=7)
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.submit("b0", job("b"))
        f = self.failureResultOf(h.scheduler.enqueue(job("c")), Unavailable)
        self.assertEqual((f.value.status, f.value.retryAfter), (503, 7))

    def test_noBackendForModel(self) -> None:
        """
        A request no available backend serves is refused with 503 at once, naming the
        model.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        f = self.failureResultOf(h.scheduler.enqueue(job("a", "other:latest")), Unavailable)
        self.assertIn("other:latest", f.value.message)
        self.assertIsNotNone(f.value.retryAfter)
        self.assertEqual(h.scheduler.snapshot(), [])

    def test_queueTimeout(self) -> None:
        """
        A request queued longer than C{queueTimeout} fails with 503 and a Retry-After; the
        ones behind it keep their own deadlines.
        """
        h = Harness(queueTimeout=30)
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.clock.advance(10)
        h.submit("a2", job("a"))
        h.clock.advance(20)
        self.assertEqual(sorted(h.failures), ["a1"])
        h.failures["a1"].trap(Unavailable)
        self.assertEqual(h.scheduler.queued, 1)
        h.clock.advance(9)
        self.assertEqual(sorted(h.failures), ["a1"])
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "a2"])
        h.clock.advance(100)
        self.assertEqual(sorted(h.failures), ["a1"])
        self.assertIsNotNone(h.failures["a1"].value.retryAfter)

    def test_noTimeoutByDefault(self) -> None:
        """
        Without C{queueTimeout} a request waits as long as it takes.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.clock.advance(10**6)
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "a1"])

    def test_stop(self) -> None:
        """
        C{stop} fails every queued request and refuses new ones with 503 "shutting down";
        running leases still release cleanly.
        """
        h = Harness(queueTimeout=5)
        b1 = onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.scheduler.stop()
        self.assertEqual(h.failures["a1"].value.message, "shutting down")
        f = self.failureResultOf(h.scheduler.enqueue(job("b")), Unavailable)
        self.assertEqual(f.value.message, "shutting down")
        h.releaseNext()
        self.assertEqual((h.scheduler.queued, h.scheduler.active, b1.active), (0, 0, 0))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.scheduler.stop()


class RetryTests(SynchronousTestCase):
    """
    A backend that fails before the first byte: the request goes to another one.
    """

    def setUp(self) -> None:
        """
        Two backends with one slot each serving the same model.
        """
        self.h = Harness()
        self.b1 = onlineBackend(self.h.pool, "b1")
        self.b2 = onlineBackend(self.h.pool, "b2")

    def failBackend(self, lease: Lease) -> Deferred[Lease]:
        """
        What the relay does when C{lease}'s backend fails before the first byte.
        """
        self.h.pool.markOffline(lease.backend, "connection refused")
        return lease.retry()

    def test_failover(self) -> None:
        """
        A retried request goes to another backend at once when one has a free slot.
        """
        lease = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        failed = lease.backend
        second = self.successResultOf(self.failBackend(lease))
        self.assertIsNot(second.backend, failed)
        self.assertEqual((failed.active, second.backend.active), (0, 1))
        self.assertEqual(self.h.scheduler.snapshot()[0]["served"], 1)

    def test_notChargedAndAhead(self) -> None:
        """
        A retried request is not charged to its user and goes back ahead of the user's
        later requests and of users that would otherwise be next.
        """
        self.h.submit("a0", job("a"))
        self.h.submit("b0", job("b"))
        self.h.submit("a1", job("a"))
        self.h.submit("b1", job("b"))
        (_, a0), (_, b0) = self.h.grants
        self.h.track("a0-retry", self.failBackend(a0))
        self.assertEqual(self.h.scheduler.queued, 3)
        b0.release()
        # a0's retry beats both b1 (A is refunded, so below B) and a1 (older).
        self.assertEqual(self.h.labels()[2:], ["a0-retry"])
        self.assertIs(self.h.grants[2][1].backend, b0.backend)
        self.assertEqual(self.h.grants[2][1].job, job("a"))
        served = {u["id"]: u["served"] for u in self.h.scheduler.snapshot()}
        self.assertEqual(served, {"a": 1, "b": 1})

    def test_badGatewayWhenNoneLeft(self) -> None:
        """
        When every backend serving the request has been tried, the retry fails with 502,
        even when a tried one is back online.
        """
        first = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        second = self.successResultOf(self.failBackend(first))
        self.h.pool.markOnline(first.backend, OLLAMA, ["m"])
        f = self.failureResultOf(self.failBackend(second), BadGateway)
        self.assertEqual(f.value.status, 502)
        self.assertEqual((self.b1.active, self.b2.active, self.h.scheduler.active), (0, 0, 0))
        self.assertEqual(self.h.scheduler.snapshot()[0]["served"], 0)

    def test_retryWaitsThenLosesBackend(self) -> None:
        """
        A retried request waiting for a busy backend fails with 502 when that backend goes
        away too.
        """
        lease = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        self.h.submit("b0", job("b"))
        retried = self.failBackend(lease)
        self.assertNoResult(retried)
        self.h.pool.markOffline(self.h.grants[0][1].backend, "gone")
        self.failureResultOf(retried, BadGateway)

    def test_cancelRetried(self) -> None:
        """
        Cancelling a queued retry removes it like any queued request.
        """
        lease = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        self.h.submit("b0", job("b"))
        retried = self.failBackend(lease)
        retried.cancel()
        self.failureResultOf(retried, CancelledError)
        self.assertEqual(self.h.scheduler.queued, 0)
        self.h.releaseNext()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_retryAfterStop(self) -> None:
        """
        A retry once the scheduler is stopped fails with 503 "shutting down".
        """
        lease = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        self.h.scheduler.stop()
        f = self.failureResultOf(self.failBackend(lease), Unavailable)
        self.assertEqual(f.value.message, "shutting down")
        self.assertEqual((self.h.scheduler.active, lease.backend.active), (0, 0))

    def test_retryOnce(self) -> None:
        """
        A lease ends once: retry after release (or twice) is a programming error, release
        after retry a no-op.
        """
        lease = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        second = self.successResultOf(self.failBackend(lease))
        lease.release()
        self.assertRaises(RuntimeError, lease.retry)
        second.release()
        self.assertRaises(RuntimeError, second.retry)
        self.assertEqual(self.h.scheduler.active, 0)


class PoolChangeTests(SynchronousTestCase):
    """
    The scheduler follows the pool: dispatches when capacity appears, fails what nothing
    serves any more.
    """

    def test_backendComingOnline(self) -> None:
        """
        A backend coming online takes the waiting requests at once.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        b2 = h.pool.add(Backend(name="b2", url="http://b2"))
        self.assertEqual(len(h.grants), 1)
        h.pool.markOnline(b2, OLLAMA, ["m"])
        self.assertEqual(h.labels(), ["a0", "a1"])
        self.assertIs(h.grants[1][1].backend, b2)

    def test_undrained(self) -> None:
        """
        Undraining a backend dispatches to it.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        onlineBackend(h.pool, "b2")
        h.pool.drain("b2")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        self.assertEqual(len(h.grants), 1)
        h.pool.drain("b2", False)
        self.assertEqual(h.labels(), ["a0", "a1"])

    def test_slotsRaised(self) -> None:
        """
        More slots on a backend (a pool change) are used at once.
        """
        h = Harness()
        b1 = onlineBackend(h.pool, "b1")
        for i in range(3):
            h.submit(f"a{i}", job("a"))
        b1.slots = 3
        h.pool.changed()
        self.assertEqual(len(h.grants), 3)

    def test_removedLeavesNoServer(self) -> None:
        """
        When the last backend serving a model goes away, its queued requests fail with 503
        and a Retry-After instead of waiting forever; running ones release cleanly.
        """
        h = Harness(healthInterval=10)
        b1 = onlineBackend(h.pool, "b1", models=["m", "n"])
        onlineBackend(h.pool, "b2", models=["n"])
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.submit("n0", job("x", "n:latest"))
        h.submit("n1", job("x", "n:latest"))
        h.pool.remove("b1")
        f = h.failures["a1"]
        f.trap(Unavailable)
        self.assertEqual(f.value.retryAfter, 10)
        self.assertEqual(sorted(h.failures), ["a1"])
        self.assertEqual(h.labels(), ["a0", "n0"])
        self.assertEqual(h.scheduler.queued, 1)
        h.releaseNext()
        self.assertEqual((b1.active, h.scheduler.queued), (0, 1))
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "n0", "n1"])


class IdleTests(SynchronousTestCase):
    """
    Idle users' state is dropped after C{idleForget}; configured and policy users stay.
    """

    def test_forgetIdle(self) -> None:
        """
        An unconfigured user idle for C{idleForget} seconds disappears from the snapshot;
        configured and policy-set users stay.
        """
        h = Harness(idleForget=60, users={"conf": UserConfig()})
        onlineBackend(h.pool, "b1", slots=3)
        h.scheduler.setPolicy("pol", weight=2)
        for user in ("conf", "pol", "anon"):
            h.submit(user, job(user))
        h.drain(3)
        h.clock.advance(59)
        self.assertEqual([u["id"] for u in h.scheduler.snapshot()], ["anon", "conf", "pol"])
        h.clock.advance(1)
        self.assertEqual([u["id"] for u in h.scheduler.snapshot()], ["conf", "pol"])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_activityPostpones(self) -> None:
        """
        A user active again before C{idleForget} passes is kept until it has been idle for
        the whole period since its last request.
        """
        h = Harness(idleForget=60)
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.drain(1)
        h.clock.advance(50)
        h.submit("a1", job("a"))
        h.clock.advance(20)
        self.assertEqual(len(h.scheduler.snapshot()), 1)
        h.drain(1)
        h.clock.advance(59)
        self.assertEqual(h.scheduler.snapshot()[0]["served"], 2)
        h.clock.advance(1)
        self.assertEqual(h.scheduler.snapshot(), [])

    def test_staggeredForgetting(self) -> None:
        """
        Users idle since different times are each forgotten C{idleForget} after their own
        last activity.
        """
        h = Harness(idleForget=60)
        onlineBackend(h.pool, "b1", slots=2)
        h.submit("a0", job("a"))
        h.drain(1)
        h.clock.advance(30)
        h.submit("b0", job("b"))
        h.drain(1)
        h.clock.advance(30)
        self.assertEqual([u["id"] for u in h.scheduler.snapshot()], ["b"])
        h.clock.advance(29)
        self.assertEqual([u["id"] for u in h.scheduler.snapshot()], ["b"])
        h.clock.advance(1)
        self.assertEqual(h.scheduler.snapshot(), [])

    def test_bookkeepingBounded(self) -> None:
        """
        A user that goes idle after each of many requests keeps one forget entry, and
        served requests do not pile up in the timeout book-keeping.
        """
        h = Harness(idleForget=60, queueTimeout=600)
        onlineBackend(h.pool, "b1")
        for i in range(1000):
            h.submit(f"a{i}", job("a"))
            h.releaseNext()
            h.clock.advance(0.01)
        self.assertEqual(len(h.scheduler._idle), 1)
        self.assertLessEqual(len(h.scheduler._deadlines), 100)
        self.assertEqual(len(h.clock.getDelayedCalls()), 2)
        h.clock.advance(600)
        self.assertEqual(h.scheduler.snapshot(), [])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_queuedUserKept(self) -> None:
        """
        A user with queued or running requests is never forgotten.
        """
        h = Harness(idleForget=60)
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("b0", job("b"))
        h.clock.advance(1000)
        self.assertEqual([u["id"] for u in h.scheduler.snapshot()], ["a", "b"])


class PolicyTests(SynchronousTestCase):
    """
    Live policy changes and the snapshot.
    """

    def test_promoteToVIP(self) -> None:
        """
        A user promoted to VIP while queued goes next.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.submit("b0", job("b"))
        h.submit("c0", job("c"))
        h.scheduler.setPolicy("c", priority="vip")
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "c0"])

    def test_demoteFromVIP(self) -> None:
        """
        A VIP demoted to normal shares with the others again instead of going first.
        """
        h = Harness(users={"v": UserConfig(priority="vip")})
        onlineBackend(h.pool, "b1")
        h.submit("x0", job("x"))
        for i in range(3):
            h.submit(f"v{i}", job("v"))
        h.submit("a0", job("a"))
        h.scheduler.setPolicy("v", priority="normal")
        h.drain(4)
        self.assertEqual(h.labels(), ["x0", "v0", "a0", "v1", "v2"])

    def test_weightChange(self) -> None:
        """
        A new weight applies to the following dispatches.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("x", job("x"))
        for i in range(4):
            h.submit(f"a{i}", job("a"))
            h.submit(f"b{i}", job("b"))
        h.scheduler.setPolicy("a", weight=4)
        h.drain(8)
        self.assertEqual(h.labels(), ["x", "a0", "b0", "a1", "a2", "a3", "b1", "b2", "b3"])

    def test_boostPolicy(self) -> None:
        """
        Setting C{boost} doubles the weight.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("x", job("x"))
        for i in range(6):
            h.submit(f"a{i}", job("a"))
            h.submit(f"b{i}", job("b"))
        h.scheduler.setPolicy("a", priority="boost")
        h.drain(9)
        # Ties (a at 1.0 and b at 1.0) go to the older request, b1.
        self.assertEqual(
            h.labels(), ["x", "a0", "b0", "a1", "b1", "a2", "a3", "b2", "a4", "a5"]
        )

    def test_manyPolicyChangesCompact(self) -> None:
        """
        Priority changes of queued users re-index them; the dead heap entries this leaves
        are compacted away, and the order stays right.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("x", job("x"))
        h.submit("a0", job("a"))
        h.submit("b0", job("b"))
        for i in range(500):
            h.scheduler.setPolicy("b", priority="vip" if i % 2 else "normal")
        h.scheduler.setPolicy("a", priority="vip")
        [cls] = h.scheduler._classes.values()
        self.assertLessEqual(sum(len(heap) for heap in cls.heaps), 40)
        h.drain(2)
        self.assertEqual(h.labels(), ["x", "a0", "b0"])

    def test_badPolicy(self) -> None:
        """
        Unknown priorities and non-positive weights are refused.
        """
        s = Harness().scheduler
        self.assertRaises(ValueError, s.setPolicy, "a", priority="gold")
        self.assertRaises(ValueError, s.setPolicy, "a", weight=0)
        self.assertRaises(ValueError, s.setPolicy, "a", weight=-1)
        self.assertEqual(s.snapshot(), [])

    def test_snapshot(self) -> None:
        """
        The snapshot lists configured and active users with their policy and counts.
        """
        h = Harness(users={"alice": UserConfig(priority="vip", weight=2)})
        onlineBackend(h.pool, "b1")
        h.submit("b0", job("bob"))
        h.submit("b1", job("bob"))
        self.assertEqual(
            h.scheduler.snapshot(),
            [
                {"id": "alice", "priority": "vip", "weight": 2, "max_queued": None,
                 "blocked": False, "queued": 0, "active": 0, "served": 0},
                {"id": "bob", "priority": "normal", "weight": 1, "max_queued": None,
                 "blocked": False, "queued": 1, "active": 1, "served": 1},
            ],
        )
        self.assertEqual((h.scheduler.queued, h.scheduler.active), (1, 1))


class ReentrancyTests(SynchronousTestCase):
    """
    Lease callbacks that call back into the scheduler.
    """

    def test_releaseInCallback(self) -> None:
        """
        A callback that releases its lease at once lets every queued request through, in
        order, without recursion.
        """
        h = Harness(maxQueuedPerUser=5000)
        b1 = onlineBackend(h.pool, "b1")
        order: list[int] = []
        blocker = self.successResultOf(h.scheduler.enqueue(job("x")))
        for i in range(3000):

            def done(lease: Lease, i: int = i) -> None:
                """
                Record the order and release at once.
                """
                order.append(i)
                lease.release()

            h.scheduler.enqueue(job("a")).addCallback(done)
        blocker.release()
        self.assertEqual(order, list(range(3000)))
        self.assertEqual((b1.active, h.scheduler.queued, h.scheduler.active), (0, 0, 0))

    def test_enqueueInCallback(self) -> None:
        """
        A callback that enqueues again gets its new request queued behind the others.
        """
        h = Harness()
        onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("b0", job("b"))

        def again(lease: Lease) -> Lease:
            """
            Queue another request from inside a lease callback, then release.
            """
            h.submit("a-again", job("a"))
            lease.release()
            return lease

        h.scheduler.enqueue(job("a")).addCallback(again)
        h.drain(1)
        self.assertEqual(h.labels(), ["a0", "b0"])
        h.drain(1)
        self.assertEqual(h.labels(), ["a0", "b0", "a-again"])

    def test_cancelGrantedInSameRound(self) -> None:
        """
        A callback that cancels another request granted in the same dispatch round (two
        slots appeared at once) gives that request's slot back instead of delivering it.
        """
        h = Harness()
        b1 = onlineBackend(h.pool, "b1", slots=1)
        blocker = self.successResultOf(h.scheduler.enqueue(job("x")))
        one = h.scheduler.enqueue(job("a"))
        two = h.scheduler.enqueue(job("b"))
        three = h.scheduler.enqueue(job("c"))

        def cancelTwo(lease: Lease) -> Lease:
            """
            Cancel the other request granted in this same round.
            """
            two.cancel()
            return lease

        one.addCallback(cancelTwo)
        b1.slots = 3
        h.pool.changed()
        self.successResultOf(one)
        self.failureResultOf(two, CancelledError)
        # two's slot went to three in the same loop.
        self.successResultOf(three)
        self.assertEqual((b1.active, h.scheduler.active, h.scheduler.queued), (3, 3, 0))
        served = {u["id"]: u["served"] for u in h.scheduler.snapshot()}
        self.assertEqual(served, {"a": 1, "b": 0, "c": 1, "x": 1})
        blocker.release()
        self.assertEqual(b1.active, 2)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_poolChangeInCallback(self) -> None:
        """
        A callback that takes the backend offline (failing the queued requests) while the
        scheduler is delivering leases leaves consistent counts.
        """
        h = Harness()
        b1 = onlineBackend(h.pool, "b1")
        h.submit("a0", job("a"))
        h.submit("a1", job("a"))
        h.submit("a2", job("a"))

        def down(lease: Lease) -> Lease:
            """
            Take the backend offline from inside a lease callback.
            """
            h.pool.markOffline(b1, "gone")
            return lease

        h.submit("b0", job("b")).addCallback(down)
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "b0"])
        self.assertEqual(sorted(h.failures), ["a1", "a2"])
        self.assertEqual((b1.active, h.scheduler.active, h.scheduler.queued), (1, 1, 0))
        h.releaseNext()
        self.assertEqual((b1.active, h.scheduler.active), (0, 0))


# --- properties ---

MODELS = ("m1", "m2")
WEIGHTS = (0.5, 1.0, 2.0, 4.0)  # powers of two keep the counters exact


@st.composite
def workloads(draw: st.DrawFn, models: tuple[str, ...], retries: bool) -> dict:
    """
    A random pool, users and sequence of operations.
    """
    backends = draw(
        st.lists(
            st.tuples(
                st.integers(1, 3),
                st.sets(st.sampled_from(models), min_size=1),
            ),
            min_size=1,
            max_size=3,
        )
    )
    users = draw(
        st.lists(
            st.tuples(st.sampled_from(("normal", "boost", "vip")), st.sampled_from(WEIGHTS)),
            min_size=1,
            max_size=5,
        )
    )
    # Weighted by repetition: queues build up when arrivals outpace releases.
    names = ["enqueue"] * 4 + ["release"] * 2 + ["cancel", "advance"]
    if retries:
        names += ["retry", "online", "online", "policy"]
    ops: list[tuple] = []
    # Long sequences: interesting states only arise after a while.
    for name in draw(st.lists(st.sampled_from(names), min_size=20, max_size=150)):
        if name == "enqueue":
            ops.append((name, draw(st.integers(0, 4)), draw(st.sampled_from(models))))
        elif name == "advance":
            ops.append((name, draw(st.integers(1, 20))))
        elif name == "online":
            ops.append((name, draw(st.integers(0, 2))))
        elif name == "policy":
            ops.append(
                (
                    name,
                    draw(st.integers(0, 4)),
                    draw(st.sampled_from(("normal", "boost", "vip"))),
                    draw(st.sampled_from(WEIGHTS)),
                )
            )
        else:
            ops.append((name, draw(st.integers(0, 50))))
    return {"backends": backends, "users": users, "ops": ops}


class Model:
    """
    The test's own book-keeping of a workload, checked against the scheduler's.

    @ivar pending: request id -> its Deferred while it waits (queued or retrying).
    @ivar held: request id -> its lease while it runs.
    @ivar firstDispatch: per (user, model), request ids in order of their first dispatch.
    @ivar dispatches: user ids in dispatch order.
    """

    def __init__(self, testCase: SynchronousTestCase, workload: dict, **config: object) -> None:
        """
        @param workload: from L{workloads}.
        @param config: further L{Config} fields.
        """
        self.testCase = testCase
        self.clock = task.Clock()
        self.pool = BackendPool()
        self.backends = []
        for i, (slots, models) in enumerate(workload["backends"]):
            self.backends.append(onlineBackend(self.pool, f"b{i}", slots, sorted(models)))
        self.models = {b: sorted(m) for b, (_, m) in zip(self.backends, workload["backends"])}
        users = {
            f"u{i}": UserConfig(priority=priority, weight=weight)
            for i, (priority, weight) in enumerate(workload["users"])
        }
        self.config = Config(users=users, maxQueuedPerUser=30, **config)  # type: ignore[arg-type]
        self.scheduler = Scheduler(self.pool, self.clock, self.config)
        self.nextID = 0
        self.pending: dict[int, Deferred[Lease]] = {}
        self.held: dict[int, Lease] = {}
        self.outcomes: dict[int, str] = {}
        self.jobs: dict[int, Job] = {}
        self.dispatched: set[int] = set()
        self.firstDispatch: dict[tuple[str, str | None], list[int]] = {}
        self.dispatches: list[str] = []
        self.onDispatch = lambda user: None
        # Assertions failing inside Deferred callbacks would be swallowed (and only
        # logged); keep them and raise them from apply(), where hypothesis sees them.
        self.errors: list[BaseException] = []

    def enqueue(self, user: str, model: str) -> None:
        """
        Enqueue a request of C{user} for C{model}.
        """
        rid = self.nextID
        self.nextID += 1
        j = job(user, model + ":latest")
        self.jobs[rid] = j
        self.follow(rid, self.scheduler.enqueue(j))

    def follow(self, rid: int, d: Deferred[Lease]) -> None:
        """
        Track C{d}, the current attempt of request C{rid}.
        """
        self.pending[rid] = d

        def granted(lease: Lease) -> None:
            """
            Check a delivered lease, keeping any assertion failure for L{check}.
            """
            try:
                grantedChecks(lease)
            except BaseException as e:
                self.errors.append(e)

        def grantedChecks(lease: Lease) -> None:
            """
            The lease belongs to this attempt, runs nowhere else, and fits its job.
            """
            self.testCase.assertIs(self.pending.pop(rid), d)
            self.testCase.assertNotIn(rid, self.held, "served twice at once")
            self.testCase.assertEqual(lease.job, self.jobs[rid])
            self.testCase.assertTrue(lease.backend.serves(lease.job.kinds, lease.job.model))
            self.held[rid] = lease
            self.dispatches.append(lease.job.user)
            if rid not in self.dispatched:
                self.dispatched.add(rid)
                key = (lease.job.user, lease.job.model)
                self.firstDispatch.setdefault(key, []).append(rid)
            self.onDispatch(lease.job.user)

        def failed(f: Failure) -> None:
            """
            Record how the attempt ended, keeping any assertion failure for L{check}.
            """
            try:
                self.testCase.assertIs(self.pending.pop(rid), d)
                f.trap(CancelledError, Unavailable, BadGateway, TooManyRequests)
                self.outcomes[rid] = f.type.__name__
            except BaseException as e:
                self.errors.append(e)

        d.addCallbacks(granted, failed)

    def apply(self, op: tuple) -> None:
        """
        Apply one operation of a workload.
        """
        kind = op[0]
        if kind == "enqueue":
            users = sorted(self.config.users)
            self.enqueue(users[op[1] % len(users)], op[2])
        elif kind == "release" and self.held:
            rid = sorted(self.held)[op[1] % len(self.held)]
            self.held.pop(rid).release()
            self.outcomes[rid] = "served"
        elif kind == "cancel" and self.pending:
            rid = sorted(self.pending)[op[1] % len(self.pending)]
            self.pending[rid].cancel()
        elif kind == "advance":
            self.clock.advance(op[1])
        elif kind == "retry" and self.held:
            rid = sorted(self.held)[op[1] % len(self.held)]
            lease = self.held.pop(rid)
            self.pool.markOffline(lease.backend, "failed")
            self.follow(rid, lease.retry())
        elif kind == "online":
            backend = self.backends[op[1] % len(self.backends)]
            self.pool.markOnline(backend, OLLAMA, self.models[backend])
        elif kind == "policy":
            users = sorted(self.config.users)
            self.scheduler.setPolicy(users[op[1] % len(users)], op[2], op[3])
        self.check()

    def check(self) -> None:
        """
        The scheduler's counts match the book-keeping; no backend runs over its slots.
        """
        if self.errors:
            raise self.errors[0]
        t = self.testCase
        for backend in self.backends:
            running = sum(1 for lease in self.held.values() if lease.backend is backend)
            t.assertEqual(backend.active, running)
            t.assertLessEqual(backend.active, backend.slots)
        t.assertEqual(self.scheduler.queued, len(self.pending))
        t.assertEqual(self.scheduler.active, len(self.held))
        snapshot = {u["id"]: u for u in self.scheduler.snapshot()}
        for user in self.config.users:
            t.assertEqual(
                snapshot[user]["queued"],
                sum(1 for rid in self.pending if self.jobs[rid].user == user),
            )

    def finish(self) -> None:
        """
        Bring every backend back and run everything to completion; every request ends
        exactly once, and each user's requests for a model were first dispatched in
        arrival order.
        """
        for backend in self.backends:
            self.pool.markOnline(backend, OLLAMA, self.models[backend])
        while self.held:
            rid = min(self.held)
            self.held.pop(rid).release()
            self.outcomes[rid] = "served"
            self.check()
        t = self.testCase
        t.assertEqual(self.pending, {})
        t.assertEqual(sorted(self.outcomes), list(range(self.nextID)))
        t.assertEqual(
            (self.scheduler.queued, self.scheduler.active, sum(b.active for b in self.backends)),
            (0, 0, 0),
        )
        for key, rids in self.firstDispatch.items():
            t.assertEqual(rids, sorted(rids), key)
        t.assertEqual(t.flushLoggedErrors(), [])


class PropertyTests(SynchronousTestCase):
    """
    Random workloads: nothing lost or served twice, slots respected, FIFO per user and
    model, and the fairness bound.
    """

    @PROPERTY_SETTINGS
    @given(workloads(MODELS, retries=True), st.sampled_from([None, 15.0]))
    def test_invariants(self, workload: dict, queueTimeout: float | None) -> None:
        """
        Over random arrivals (users, weights, priorities, models), cancellations, releases,
        backend failures with retries, policy changes, timeouts and slot counts: every
        request ends exactly once (served, cancelled or failed), a backend never runs more
        than its slots, the counts are exact at every step, and each user's requests for a
        model are first dispatched in arrival order.
        """
        model = Model(self, workload, queueTimeout=queueTimeout, idleForget=30.0)
        for op in workload["ops"]:
            model.apply(op)
        model.finish()

    @PROPERTY_SETTINGS
    @given(workloads(("m",), retries=False))
    def test_fairnessBound(self, workload: dict) -> None:
        """
        While a user I{i} is backlogged, no other user I{j} of the same tier is dispatched
        more than C{floor(w_j / w_i) + 1} times before I{i}'s next dispatch (weights with
        boost applied). So I{i} waits at most C{sum over j != i of (floor(w_j/w_i) + 1)}
        dispatches of its tier, C{2(n - 1)} for I{n} equal users.
        """
        model = Model(self, workload)
        users = model.config.users

        weight = functools.partial(effectiveWeight, users)
        tier = functools.partial(isVIP, users)

        # since[i][j]: dispatches of j since i was last dispatched or became backlogged.
        since: dict[str, Counter[str]] = {}

        def backlogged(user: str) -> bool:
            """
            Whether the user has a request waiting.
            """
            return any(model.jobs[rid].user == user for rid in model.pending)

        def onDispatch(user: str) -> None:
            """
            Count C{user}'s dispatch against every waiting user of its tier and check the bound.
            """
            since[user] = Counter()
            for i, counts in list(since.items()):
                if i == user or tier(i) != tier(user):
                    continue
                if not backlogged(i):
                    del since[i]
                    continue
                counts[user] += 1
                bound = math.floor(weight(user) / weight(i)) + 1
                self.assertLessEqual(
                    counts[user], bound, f"{user} served {counts[user]} times while {i} waited"
                )

        model.onDispatch = onDispatch
        for op in workload["ops"]:
            if op[0] == "enqueue":
                user = sorted(users)[op[1] % len(users)]
                if not backlogged(user):
                    since[user] = Counter()
            model.apply(op)
            for user in list(since):
                if not backlogged(user):
                    del since[user]
        model.finish()


# --- service in lease seconds ---


class LeaseSecondsTests(SynchronousTestCase):
    """
    C{fair_share = "time"}: users share lease seconds (GPU time), not requests.
    """

    def contend(
        self,
        fairShare: str,
        durations: dict[str, float],
        weights: dict[str, float] | None = None,
        slots: int = 1,
        dispatches: int = 400,
    ) -> list[Counter[str]]:
        """
        Keep every user of C{durations} backlogged (4 queued requests each) on one backend
        with C{slots} slots, each of C{user}'s leases lasting C{durations[user]} seconds on
        the clock, until C{dispatches} requests were dispatched.

        @return: after each dispatch, the lease seconds dispatched so far, per user.
        """
        users = {u: UserConfig(weight=w) for u, w in (weights or {}).items()}
        h = Harness(users=users, maxQueuedPerUser=1000, fairShare=fairShare)
        onlineBackend(h.pool, "b1", slots=slots)
        seconds: Counter[str] = Counter()
        prefixes: list[Counter[str]] = []

        def granted(lease: Lease) -> Lease:
            """
            Count the lease's seconds, end it when they are up, and queue the user's next
            request so the queue depth stays the same.
            """
            user = lease.job.user
            seconds[user] += durations[user]
            prefixes.append(Counter(seconds))
            h.clock.callLater(durations[user], lease.release)
            if len(prefixes) < dispatches:
                h.scheduler.enqueue(job(user)).addCallback(granted)
            return lease

        for _ in range(4):
            for user in durations:
                h.scheduler.enqueue(job(user)).addCallback(granted)
        while len(prefixes) < dispatches:
            h.clock.advance(0.5)
        return prefixes[:dispatches]

    def test_unknownFairShare(self) -> None:
        """
        A unit of service the scheduler does not know is refused when it is built (the
        config file's check names the key; this guards configs built in code).
        """
        with self.assertRaises(ValueError) as caught:
            Harness(fairShare="tokens")
        self.assertIn("'tokens'", str(caught.exception))

    def test_longAnswersEqualTime(self) -> None:
        """
        Two equal users, one whose leases last three times as long: each gets half the
        lease seconds (48-52% over 400 dispatches, and never more than one long lease
        ahead of the other), where counting requests gives the long user 75%.
        """
        durations = {"long": 3.0, "short": 1.0}
        prefixes = self.contend("time", durations)
        final = prefixes[-1]
        share = final["long"] / (final["long"] + final["short"])
        self.assertTrue(0.48 <= share <= 0.52, share)
        for prefix in prefixes:
            self.assertLessEqual(abs(prefix["long"] - prefix["short"]), 3.0, prefix)

        final = self.contend("requests", durations)[-1]
        share = final["long"] / (final["long"] + final["short"])
        self.assertAlmostEqual(share, 0.75, delta=0.01)

    def test_weightsOneToThreeInTime(self) -> None:
        """
        Weights 1 and 3 split lease seconds 1:3 (73-77%) even when the heavier user's leases
        are twice as long; counting requests would give it 6:1 (86%).
        """
        durations = {"plain": 1.0, "heavy": 2.0}
        weights = {"plain": 1.0, "heavy": 3.0}
        final = self.contend("time", durations, weights)[-1]
        share = final["heavy"] / (final["heavy"] + final["plain"])
        self.assertTrue(0.73 <= share <= 0.77, share)

        final = self.contend("requests", durations, weights)[-1]
        share = final["heavy"] / (final["heavy"] + final["plain"])
        self.assertAlmostEqual(share, 6 / 7, delta=0.01)

    def test_manySlotsEqualTime(self) -> None:
        """
        With four slots the provisional charges keep the long user from taking the slots
        the short user's requests free up: the lease seconds still split 48-52%.
        """
        prefixes = self.contend("time", {"long": 3.0, "short": 1.0}, slots=4, dispatches=800)
        final = prefixes[-1]
        share = final["long"] / (final["long"] + final["short"])
        self.assertTrue(0.48 <= share <= 0.52, share)

    def burst(self, h: Harness, slots: int, counts: dict[str, int]) -> None:
        """
        Queue C{counts[user]} requests per user (in that order) while another user holds
        the only slot of C{b1}, then give C{b1} C{slots} more: they are filled in one go,
        before any lease ends.
        """
        backend = h.pool.get("b1")
        backend.slots = 1
        self.successResultOf(h.scheduler.enqueue(job("blocker")))
        for user, count in counts.items():
            for i in range(count):
                h.submit(f"{user}{i}", job(user))
        backend.slots = slots + 1
        h.pool.changed()

    def test_burstOfFreshUsersAlternates(self) -> None:
        """
        Before any lease has ended every request is expected to last 1 second, so two new
        users filling four free slots at once alternate.
        """
        h = Harness(fairShare="time", maxQueuedPerUser=100)
        onlineBackend(h.pool, "b1")
        self.burst(h, 4, {"a": 10, "b": 10})
        self.assertEqual(h.labels(), ["a0", "b0", "a1", "b1"])
        self.assertEqual(h.scheduler.queued, 16)

    def runAlone(self, h: Harness, user: str, duration: float) -> None:
        """
        Run one request of C{user} for C{duration} seconds with nobody else around.
        """
        lease = self.successResultOf(h.scheduler.enqueue(job(user)))
        h.clock.advance(duration)
        lease.release()

    def learnedHistory(self) -> Harness:
        """
        A harness where C{a} ran one 3-second lease and C{b} three 1-second ones, one at a
        time: both have received 3 lease seconds (equal counters), and their estimates are
        3 and 1 seconds.
        """
        h = Harness(fairShare="time", maxQueuedPerUser=100)
        onlineBackend(h.pool, "b1")
        self.runAlone(h, "a", 3)
        for _ in range(3):
            self.runAlone(h, "b", 1)
        return h

    def test_burstSplitByEstimate(self) -> None:
        """
        Once the estimates are known (3 s for a, 1 s for b), a burst filling eight free
        slots at once gives b three requests for each one of a's.
        """
        h = self.learnedHistory()
        self.burst(h, 8, {"a": 8, "b": 8})
        self.assertEqual(h.labels(), ["a0", "b0", "b1", "b2", "a1", "b3", "b4", "b5"])

    def test_longerThanEstimateCharged(self) -> None:
        """
        A lease that runs longer than estimated charges the excess at its release: a new
        user's first lease is expected to last 1 second; when it lasts 3, the other user
        (1-second leases) goes three times before it goes again.
        """
        h = Harness(fairShare="time", maxQueuedPerUser=100)
        onlineBackend(h.pool, "b1")
        self.burst(h, 1, {"a": 3, "b": 4})
        h.clock.advance(3)
        h.releaseNext()
        for _ in range(3):
            h.clock.advance(1)
            h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "b0", "b1", "b2", "a1"])

    def test_shorterThanEstimateRefunded(self) -> None:
        """
        A lease that ends before its estimate gives the difference back at once: a,
        expected to take 3 seconds, takes 1, and is next again after one of b's 1-second
        leases instead of after three.
        """
        h = self.learnedHistory()
        self.burst(h, 1, {"a": 2, "b": 3})
        for _ in range(3):
            h.clock.advance(1)
            h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "b0", "a1", "b1"])

    def test_correctionAcrossModels(self) -> None:
        """
        A correction that lowers a user's counter reaches the user's queues for every
        model: after a's 3-second estimate for m turns out to be 1 second, a's queued
        request for n is ordered by the corrected counter.
        """
        h = self.learnedHistory()
        n = onlineBackend(h.pool, "b2", models=["n"])
        other = self.successResultOf(h.scheduler.enqueue(job("x", "n:latest")))
        self.burst(h, 1, {"a": 1, "b": 1})
        h.submit("a-n", job("a", "n:latest"))
        h.submit("b-n", job("b", "n:latest"))
        self.assertEqual(h.labels(), ["a0"])
        h.clock.advance(1)
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "b0"])
        # a is at 3 + 1 = 4 seconds, b at 3 + 1 provisional: tied, a's request is older.
        # (Had a's entry for n kept the key it was queued with, 3 + 3, b would go first.)
        other.release()
        self.assertEqual(h.labels(), ["a0", "b0", "a-n"])
        self.assertIs(h.grants[-1][1].backend, n)

    def test_retryRefundedEntirely(self) -> None:
        """
        A retried lease is not charged in lease seconds either, whatever time it held the
        slot, and teaches nothing about the user's durations.
        """
        h = Harness(fairShare="time")
        onlineBackend(h.pool, "b1")
        onlineBackend(h.pool, "b2")
        h.submit("a0", job("a"))
        h.submit("b0", job("b"))
        h.submit("a1", job("a"))
        h.submit("b1", job("b"))
        (_, a0), (_, b0) = h.grants
        h.clock.advance(5)
        h.pool.markOffline(a0.backend, "connection refused")
        h.track("a0-retry", a0.retry())
        state = h.scheduler._users["a"]
        self.assertEqual((state.counter, state.meanLease, state.modelLease), (0.0, None, {}))
        b0.release()
        # a0's retry beats b1 (a is back at 0, b at 5) and a1 (older).
        self.assertEqual(h.labels()[2:], ["a0-retry"])
        self.assertEqual(h.scheduler._users["b"].counter, 5.0)

    def test_idleCorrectionBanksNoCredit(self) -> None:
        """
        A user that used less than its share because it asked for less banks nothing when
        its lease's correction lands: a holds one slot of four (estimated 10 s, ends after
        4) while b's 1-second leases fill the other three; back with a burst, a starts at
        the virtual time, not at its own lower counter, and takes one of the four slots
        that free up, not all of them.
        """
        h = Harness(fairShare="time", maxQueuedPerUser=100)
        onlineBackend(h.pool, "b1", slots=4)
        self.runAlone(h, "a", 10)
        lease = self.successResultOf(h.scheduler.enqueue(job("a")))
        for i in range(40):
            h.submit(f"b{i}", job("b"))

        def tick() -> None:
            """
            One second passes; b's leases last one second.
            """
            h.clock.advance(1)
            for _, held in list(h.grants):
                if not held._finished and h.clock.seconds() - held._grantedAt >= 1:
                    held.release()

        for _ in range(4):
            tick()
        lease.release()
        users = h.scheduler._users
        self.assertEqual((users["a"].counter, users["b"].counter), (14.0, 26.0))
        for i in range(6):
            h.submit(f"a{i}", job("a"))
        # Lifted to V: b's last start, 25, instead of keeping 11 seconds of credit.
        self.assertEqual(users["a"].counter, 25.0)
        before = len(h.grants)
        tick()
        self.assertEqual(h.labels()[before:], ["a0", "b16", "b17", "b18"])


DURATIONS = (0.0, 0.5, 1.0, 2.0, 3.0, 7.0)


@st.composite
def timedWorkloads(draw: st.DrawFn) -> dict:
    """
    A random pool serving one model, users whose leases last random durations, and a
    sequence of arrivals, cancellations and clock advances (leases end by themselves).
    """
    slots = draw(st.one_of(st.just([1]), st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    users = draw(
        st.lists(
            st.tuples(
                st.sampled_from(("normal", "boost", "vip")),
                st.sampled_from(WEIGHTS),
                st.lists(st.sampled_from(DURATIONS), min_size=1, max_size=4),
            ),
            min_size=1,
            max_size=4,
        )
    )
    names = ["enqueue"] * 4 + ["cancel", "advance", "advance"]
    ops: list[tuple] = []
    for name in draw(st.lists(st.sampled_from(names), min_size=20, max_size=150)):
        if name == "enqueue":
            ops.append((name, draw(st.integers(0, 3)), "m"))
        elif name == "advance":
            ops.append((name, draw(st.sampled_from((0.5, 1, 2, 5)))))
        else:
            ops.append((name, draw(st.integers(0, 50))))
    return {
        "backends": [(n, {"m"}) for n in slots],
        "users": [(priority, weight) for priority, weight, _ in users],
        "durations": [durations for _, _, durations in users],
        "ops": ops,
    }


@attrs.define(eq=False)
class _Window:
    """
    An interval during which a user I{i} is backlogged and not dispatched (see the
    time-mode bound in L{ollamamq.scheduler}).

    @ivar last: I{i}'s last lease started before the interval, if any.
    @ivar running: the leases running when I{i} was last dispatched (but that one) or
        when the interval began.
    @ivar others: per other user of I{i}'s tier, its leases dispatched in the interval and,
        for each, its earlier ones of the interval still running then.
    """

    user: str
    last: Lease | None
    running: frozenset[Lease]
    others: dict[str, list[tuple[Lease, list[Lease]]]] = attrs.field(factory=dict)


class TimedPropertyTests(SynchronousTestCase):
    """
    Random workloads in lease seconds: nothing lost or served twice, slots respected, FIFO
    per user, the heap invariant, and the time-mode fairness bound.
    """

    def assertKeysAreLowerBounds(self, scheduler: Scheduler) -> None:
        """
        Every valid heap entry's key is at most its user's counter (a correction that
        lowers a counter re-pushed the user's entries), so the top of a heap is never
        above a user that should go before it.
        """
        for cls in scheduler._classes.values():
            for heap in cls.heaps:
                for entry in heap:
                    queue = entry[3]
                    if queue.entry is entry:
                        self.assertLessEqual(entry[0], queue.user.counter, queue.user.id)

    @PROPERTY_SETTINGS
    @given(workloads(MODELS, retries=True), st.sampled_from([None, 15.0]))
    def test_invariantsWithRetries(self, workload: dict, queueTimeout: float | None) -> None:
        """
        L{PropertyTests.test_invariants} with C{fair_share = "time"} (two models, backend
        failures with retries, policy changes, timeouts; leases last from their grant to
        the release operation): every request ends exactly once, slots and counts hold,
        FIFO per user and model, and no heap key is ever above its user's counter.
        """
        model = Model(self, workload, queueTimeout=queueTimeout, idleForget=30.0, fairShare="time")
        for op in workload["ops"]:
            model.apply(op)
            self.assertKeysAreLowerBounds(model.scheduler)
        model.finish()

    @PROPERTY_SETTINGS
    @given(timedWorkloads())
    def test_invariantsAndBound(self, workload: dict) -> None:
        """
        Over random arrivals, cancellations and lease durations, with C{fair_share =
        "time"}: every request ends exactly once, backends never run more than their
        slots, counts are exact at every step, each user's requests are dispatched in
        arrival order, and while a user I{i} is backlogged and not dispatched another
        user I{j} of its tier is dispatched at most
        C{(w_j / w_i) d_i + d_j + w_j e} lease seconds, with C{e = 0} for one slot (see
        the module docstring of L{ollamamq.scheduler}).
        """
        model = Model(self, workload, fairShare="time")
        users = model.config.users
        names = sorted(users)
        slots = sum(n for n, _ in workload["backends"])
        durations = dict(zip(names, workload["durations"]))
        leaseCount: Counter[str] = Counter()
        grantedAt: dict[Lease, float] = {}
        releasedAt: dict[Lease, float] = {}
        lastLease: dict[str, Lease] = {}
        lastRunning: dict[str, frozenset[Lease]] = {}
        open_: dict[str, _Window] = {}
        closed: list[_Window] = []

        weight = functools.partial(effectiveWeight, users)
        tier = functools.partial(isVIP, users)

        def backlogged(user: str) -> bool:
            """
            Whether the user has a request waiting.
            """
            return any(model.jobs[rid].user == user for rid in model.pending)

        def running() -> frozenset[Lease]:
            """
            The leases held now.
            """
            return frozenset(model.held.values())

        def close(user: str) -> None:
            """
            End the user's open interval, if any.
            """
            window = open_.pop(user, None)
            if window is not None:
                closed.append(window)

        def release(rid: int, lease: Lease) -> None:
            """
            A lease's time is up: release it as the relay would.
            """
            if model.held.get(rid) is lease:
                del model.held[rid]
                releasedAt[lease] = model.clock.seconds()
                lease.release()
                model.outcomes[rid] = "served"
                self.assertKeysAreLowerBounds(model.scheduler)

        def onDispatch(user: str) -> None:
            """
            Give the new lease its duration, and account it to the open intervals.
            """
            [(rid, lease)] = [(r, x) for r, x in model.held.items() if x not in grantedAt]
            grantedAt[lease] = model.clock.seconds()
            mine = durations[user]
            model.clock.callLater(mine[leaseCount[user] % len(mine)], release, rid, lease)
            leaseCount[user] += 1
            others = running() - {lease}
            for i, window in open_.items():
                if i == user or tier(i) != tier(user):
                    continue
                earlier = window.others.setdefault(user, [])
                stillRunning = [x for x, _ in earlier if x in others]
                earlier.append((lease, stillRunning))
            close(user)
            lastLease[user] = lease
            lastRunning[user] = others
            if backlogged(user):
                open_[user] = _Window(user, lease, others)

        model.onDispatch = onDispatch
        for op in workload["ops"]:
            if op[0] == "enqueue":
                user = names[op[1] % len(names)]
                if not backlogged(user):
                    last = lastLease.get(user)
                    before = lastRunning.get(user, frozenset()) - {last}
                    open_[user] = _Window(user, last, before | running())
            model.apply(op)
            self.assertKeysAreLowerBounds(model.scheduler)
            for user in list(open_):
                if not backlogged(user):
                    close(user)
        while model.held or model.pending:
            model.clock.advance(1)
            model.check()
        for user in list(open_):
            close(user)
        model.finish()

        def duration(lease: Lease) -> float:
            """
            How long the lease ran.
            """
            return releasedAt[lease] - grantedAt[lease]

        def estimate(lease: Lease) -> float:
            """
            The duration charged at its dispatch (seconds, before the weight).
            """
            return lease._charge * lease._weight

        for window in closed:
            i = window.user
            r = window.last
            d_i = max(duration(r), estimate(r)) if r is not None else 0.0
            before = window.running - {r}
            e_i = sum(
                max(0.0, duration(x) - estimate(x)) / weight(i)
                for x in before
                if x.job.user == i
            )
            e_all = sum(max(0.0, estimate(x) - duration(x)) / x._weight for x in before)
            for j, leases in window.others.items():
                total = sum(duration(x) for x, _ in leases)
                lastJ, stillRunning = leases[-1]
                e_j = sum(max(0.0, duration(x) - estimate(x)) / weight(j) for x in stillRunning)
                slack = 0.0 if slots == 1 else weight(j) * (e_i + e_all + e_j)
                bound = weight(j) / weight(i) * d_i + duration(lastJ) + slack
                self.assertLessEqual(
                    total,
                    bound + 1e-9,
                    f"{j} got {total} s while {i} waited (bound {bound}, slots {slots})",
                )


class MaxRunningTests(SynchronousTestCase):
    """
    C{max_running}: a user's extra requests wait in the queue while the user holds that
    many leases; they are never refused for it.
    """

    def setUp(self) -> None:
        """
        One backend with four slots; alice may run one request at once.
        """
        self.h = Harness(users={"alice": UserConfig(maxRunning=1)})
        self.backend = onlineBackend(self.h.pool, "b1", slots=4)

    def test_extraRequestsWait(self) -> None:
        """
        Three requests from alice: one runs, two wait (though slots are free) and run one
        at a time as her leases end, in order.
        """
        for i in range(3):
            self.h.submit(f"a{i}", job("alice"))
        self.assertEqual(self.h.labels(), ["a0"])
        self.assertEqual(self.h.scheduler.queued, 2)
        self.assertEqual(self.h.failures, {})
        self.h.releaseNext()
        self.assertEqual(self.h.labels(), ["a0", "a1"])
        self.h.releaseNext()
        self.assertEqual(self.h.labels(), ["a0", "a1", "a2"])
        self.assertEqual(self.h.scheduler.queued, 0)

    def test_othersUseTheFreeSlots(self) -> None:
        """
        While alice is at her limit, other users get the free slots; when her lease ends
        she is next (she has had the least service), ahead of bob's backlog.
        """
        self.h.submit("a0", job("alice"))
        self.h.submit("a1", job("alice"))
        for i in range(5):
            self.h.submit(f"b{i}", job("bob"))
        self.assertEqual(self.h.labels(), ["a0", "b0", "b1", "b2"])
        self.h.releaseNext()
        self.assertEqual(self.h.labels()[-1], "a1")

    def test_serverDefault(self) -> None:
        """
        C{max_running_per_user} limits every user without a value of their own; a
        configured value overrides it.
        """
        h = Harness(maxRunningPerUser=2, users={"vip": UserConfig(maxRunning=3)})
        onlineBackend(h.pool, "b1", slots=8)
        for i in range(4):
            h.submit(f"x{i}", job("ip:10.0.0.1"))
            h.submit(f"v{i}", job("vip"))
        h.scheduler.setPolicy("carol", weight=2)
        for i in range(3):
            h.submit(f"c{i}", job("carol"))
        self.assertEqual(sorted(h.labels()), ["c0", "c1", "v0", "v1", "v2", "x0", "x1"])

    def test_cancelWhileParked(self) -> None:
        """
        A waiting request of a capped user can be cancelled; it never runs.
        """
        self.h.submit("a0", job("alice"))
        d = self.h.submit("a1", job("alice"))
        self.h.submit("a2", job("alice"))
        d.cancel()
        self.assertTrue(self.h.failures["a1"].check(CancelledError))
        self.h.releaseNext()
        self.assertEqual(self.h.labels(), ["a0", "a2"])
        self.assertEqual(self.h.scheduler.queued, 0)

    def test_parkedFailWithPoolAndStop(self) -> None:
        """
        Parked requests fail like any queued one when nothing serves them any more, and
        when the scheduler stops.
        """
        self.h.submit("a0", job("alice"))
        self.h.submit("a1", job("alice"))
        self.h.pool.markOffline(self.backend, "gone")
        self.assertTrue(self.h.failures["a1"].check(Unavailable))
        self.assertEqual(self.h.scheduler.queued, 0)
        self.h.pool.markOnline(self.backend, OLLAMA, ["m"])
        self.h.submit("a2", job("alice"))
        self.h.scheduler.stop()
        self.assertIn("shutting down", str(self.h.failures["a2"].value))

    def test_retryKeepsPlace(self) -> None:
        """
        A retried request (its backend failed before answering) ends its lease, so it is
        not held back by the user's own limit.
        """
        other = onlineBackend(self.h.pool, "b2", slots=1)
        self.h.submit("a0", job("alice"))
        self.h.submit("a1", job("alice"))
        lease = self.h.grants[0][1]
        retried: list[Lease] = []
        lease.retry().addCallback(retried.append)
        self.assertEqual(len(retried), 1)
        self.assertNotEqual(retried[0].backend, lease.backend)
        self.assertIn(retried[0].backend, (other, self.backend))
        self.assertEqual(self.h.labels(), ["a0"])

    def test_reconfigure(self) -> None:
        """
        A reloaded config changes C{max_running} from now on: a raised limit lets the
        waiting requests run at once.
        """
        self.h.submit("a0", job("alice"))
        self.h.submit("a1", job("alice"))
        self.assertEqual(self.h.labels(), ["a0"])
        self.h.scheduler.reconfigure(Config(users={"alice": UserConfig(maxRunning=2)}))
        self.assertEqual(self.h.labels(), ["a0", "a1"])
        self.h.scheduler.reconfigure(Config(maxRunningPerUser=1))
        self.h.submit("a2", job("alice"))
        self.h.releaseNext()
        self.assertEqual(self.h.labels(), ["a0", "a1"])
        self.h.releaseNext()
        self.assertEqual(self.h.labels(), ["a0", "a1", "a2"])


class GraceTests(SynchronousTestCase):
    """
    Requests whose only backends are unavailable wait for them for C{down_grace} seconds
    (never failing the queue at the first failure), and busy backends are waited for.
    """

    def setUp(self) -> None:
        """
        One backend with one slot, a grace of 30 seconds.
        """
        self.h = Harness(downGrace=30.0)
        self.b = onlineBackend(self.h.pool, "b")

    def fail(self, reason: str = "connection refused") -> None:
        """
        What the forwarder and the probes do when the backend fails now.
        """
        self.h.pool.markFailed(self.b, reason, self.h.clock.seconds(), downAfter=3)

    def test_queuedWaitThroughFailure(self) -> None:
        """
        A backend failure leaves the requests queued for it queued; they are dispatched
        when it is back.
        """
        self.h.submit("a0", job("a"))
        self.h.submit("a1", job("a"))
        self.h.submit("b0", job("b"))
        self.fail()
        self.h.grants[0][1].release()
        self.h.clock.advance(29)
        self.assertEqual((self.h.scheduler.queued, self.h.failures), (2, {}))
        self.h.pool.markOnline(self.b, OLLAMA, ["m"])
        self.assertEqual(self.h.labels(), ["a0", "b0"])

    def test_graceEnds(self) -> None:
        """
        When the grace is over, the waiting requests get 503 with Retry-After, and new
        ones are refused at once; requests arriving during the grace wait too.
        """
        self.fail()
        self.h.clock.advance(10)
        self.h.submit("late", job("a"))
        self.assertEqual(self.h.scheduler.queued, 1)
        self.h.clock.advance(19.9)
        self.assertEqual(self.h.failures, {})
        self.h.clock.advance(0.2)
        f = self.h.failures["late"]
        self.assertEqual((f.value.status, f.value.code), (503, "no_backend"))
        self.assertIsNotNone(f.value.retryAfter)
        self.failureResultOf(self.h.scheduler.enqueue(job("c")), Unavailable)

    def test_graceCountsFromFirstFailure(self) -> None:
        """
        Further failures (the backend going offline after more failed probes) do not
        extend the grace.
        """
        self.h.submit("a0", job("a"))
        self.h.submit("a1", job("a"))
        self.fail()
        self.h.clock.advance(20)
        self.fail()
        self.fail()
        self.assertEqual(self.b.state, "offline")
        self.h.clock.advance(9.9)
        self.assertEqual(self.h.failures, {})
        self.h.clock.advance(0.2)
        self.assertIn("a1", self.h.failures)

    def test_retryWaitsForSameBackend(self) -> None:
        """
        A request whose only backend failed before answering is not failed: it waits for
        that backend and goes back to it, uncharged, when it returns.
        """
        lease = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        self.fail()
        retried = lease.retry()
        self.assertNoResult(retried)
        self.h.pool.markOnline(self.b, OLLAMA, ["m"])
        again = self.successResultOf(retried)
        self.assertIs(again.backend, self.b)
        self.assertEqual(self.h.scheduler.snapshot()[0]["served"], 1)

    def test_retryPrefersUntried(self) -> None:
        """
        With another backend serving the request, a retry goes there, not back.
        """
        other = onlineBackend(self.h.pool, "c")
        lease = self.successResultOf(self.h.scheduler.enqueue(job("a")))
        first = lease.backend
        self.h.pool.markFailed(first, "x", 0, downAfter=3)
        second = self.successResultOf(lease.retry())
        self.assertIsNot(second.backend, first)
        self.assertIn(second.backend, (self.b, other))

    def test_busyIsWaitedFor(self) -> None:
        """
        A busy backend (429, loading) takes nothing new until it is ready; what waits for
        it is neither failed nor charged.
        """
        self.h.pool.markBusy(self.b, 5.0)
        self.h.submit("a0", job("a"))
        self.assertEqual((self.h.scheduler.queued, self.h.failures), (1, {}))
        self.h.clock.advance(100)
        self.assertEqual(self.h.failures, {})
        self.h.pool.markReady(self.b)
        self.assertEqual(self.h.labels(), ["a0"])

    def test_drainingHasNoGrace(self) -> None:
        """
        Requests only a draining backend could serve are failed at once: it is not
        coming back by itself.
        """
        self.h.submit("a0", job("a"))
        self.h.submit("a1", job("a"))
        self.h.pool.drain("b")
        self.assertIn("a1", self.h.failures)

    def test_queueTimeoutStillApplies(self) -> None:
        """
        The grace never extends a request's wait beyond C{queue_timeout}.
        """
        h = Harness(downGrace=30.0, queueTimeout=5.0)
        b = onlineBackend(h.pool, "b")
        h.pool.markFailed(b, "x", 0, downAfter=3)
        h.submit("a0", job("a"))
        h.clock.advance(5.1)
        self.assertEqual(h.failures["a0"].value.code, "queue_timeout")


class BoundTests(SynchronousTestCase):
    """
    Bounds a client cannot push: per client address, queued body bytes, tracked users.
    """

    def test_perPeer(self) -> None:
        """
        One client address may hold C{max_queued_per_peer} queued requests whatever user
        ids it sends (429 beyond); others are not affected, and a slot frees when one of
        its requests is dispatched or cancelled.
        """
        h = Harness(maxQueuedPerPeer=2)
        onlineBackend(h.pool, "b")
        h.submit("busy", Job(user="z", kinds=API, model="m:latest", peer="10.0.0.9"))
        d1 = h.submit("u1", Job(user="u1", kinds=API, model="m:latest", peer="10.0.0.1"))
        h.submit("u2", Job(user="u2", kinds=API, model="m:latest", peer="10.0.0.1"))
        h.submit("u3", Job(user="u3", kinds=API, model="m:latest", peer="10.0.0.1"))
        f = h.failures["u3"]
        self.assertEqual((f.value.status, f.value.code), (429, "peer_queue_full"))
        self.assertGreaterEqual(f.value.retryAfter, 1)
        h.submit("other", Job(user="u4", kinds=API, model="m:latest", peer="10.0.0.2"))
        self.assertNotIn("other", h.failures)
        d1.cancel()
        h.submit("u5", Job(user="u5", kinds=API, model="m:latest", peer="10.0.0.1"))
        self.assertNotIn("u5", h.failures)
        self.assertEqual(h.scheduler._peerQueued, {"10.0.0.1": 2, "10.0.0.2": 1})

    def test_queuedBytes(self) -> None:
        """
        The bodies held by queued requests are bounded (503 beyond); dispatch frees them.
        """
        h = Harness(maxQueuedBytes=1000)
        onlineBackend(h.pool, "b")
        h.submit("running", Job(user="a", kinds=API, model="m:latest", size=900))
        h.submit("q1", Job(user="a", kinds=API, model="m:latest", size=600))
        h.submit("q2", Job(user="b", kinds=API, model="m:latest", size=401))
        self.assertEqual(h.failures["q2"].value.code, "queue_bytes_full")
        h.submit("q3", Job(user="b", kinds=API, model="m:latest", size=400))
        self.assertNotIn("q3", h.failures)
        h.releaseNext()
        self.assertEqual(h.labels(), ["running", "q3"])
        self.assertEqual(h.scheduler._queuedBytes, 600)

    def test_trackedUsers(self) -> None:
        """
        Beyond C{max_users} tracked users, the idle ones active least recently are
        forgotten first; configured users and users with requests never are.
        """
        h = Harness(maxUsers=3, users={"conf": UserConfig()})
        onlineBackend(h.pool, "b", slots=10)
        for user in ("old", "mid"):
            self.successResultOf(h.scheduler.enqueue(job(user))).release()
            h.clock.advance(1)
        busy = self.successResultOf(h.scheduler.enqueue(job("busy")))
        ids = lambda: sorted(u["id"] for u in h.scheduler.snapshot())
        # "busy" made room by forgetting "old", the idle user active least recently.
        self.assertEqual(ids(), ["busy", "conf", "mid"])
        self.successResultOf(h.scheduler.enqueue(job("new")))
        self.assertEqual(ids(), ["busy", "conf", "new"])
        # Nobody left to forget: a user with a request is admitted over the cap (what
        # is queued and running is bounded on its own).
        self.successResultOf(h.scheduler.enqueue(job("newer")))
        self.assertEqual(ids(), ["busy", "conf", "new", "newer"])
        busy.release()


class ControlPlaneTests(SynchronousTestCase):
    """
    The scheduler's operator hooks: blocks, limits, listing, cancelling, events and
    reconfiguring.
    """

    def setUp(self) -> None:
        self.h = Harness()
        onlineBackend(self.h.pool, "b0")
        self.events: list[tuple[str, dict]] = []
        self.h.scheduler.subscribe(lambda name, payload: self.events.append((name, payload)))

    def test_blockUserRefusesAndFailsQueued(self) -> None:
        """
        Blocking a user fails its queued requests with 403 at once, refuses new ones with
        403, and lets its running request finish; other users are untouched.
        """
        h = self.h
        h.submit("a0", job("alice"))
        h.submit("a1", job("alice"))
        h.submit("b0", job("bob"))
        h.scheduler.setBlocked("alice", True)
        self.assertEqual(h.failures["a1"].value.status, 403)
        self.assertEqual(h.failures["a1"].value.code, "user_blocked")
        h.submit("a2", job("alice"))
        self.assertEqual(h.failures["a2"].value.status, 403)
        self.assertEqual(h.labels(), ["a0"])
        h.releaseNext()
        self.assertEqual(h.labels(), ["a0", "b0"])
        self.assertEqual(h.scheduler.user("alice")["blocked"], True)
        h.scheduler.setBlocked("alice", False)
        h.submit("a3", job("alice"))
        self.assertNotIn("a3", h.failures)
        self.assertIn(
            ("request.cancelled", {"id": "q1", "user": "alice", "model": "m:latest",
                                   "reason": "blocked"}),
            self.events,
        )

    def test_blockNetwork(self) -> None:
        """
        A blocked network refuses its peers (IPv4, and IPv4-mapped IPv6) and fails their
        queued requests; other peers and unparseable peers pass; unblocking lifts it.
        """
        h = self.h
        h.submit("run", Job(user="x", kinds=API, model="m:latest", peer="192.0.2.1"))
        h.submit("inside", Job(user="x", kinds=API, model="m:latest", peer="10.1.2.3"))
        h.submit("outside", Job(user="y", kinds=API, model="m:latest", peer="10.2.0.1"))
        net = ipaddress.ip_network("10.1.0.0/16")
        h.scheduler.blockNetwork(net)
        self.assertEqual(h.failures["inside"].value.code, "address_blocked")
        self.assertNotIn("outside", h.failures)
        h.submit("mapped", Job(user="z", kinds=API, model="m:latest", peer="::ffff:10.1.9.9"))
        self.assertEqual(h.failures["mapped"].value.status, 403)
        h.submit("odd", Job(user="z", kinds=API, model="m:latest", peer="not-an-ip"))
        self.assertNotIn("odd", h.failures)
        self.assertEqual(h.scheduler.blockedNetworks(), [net])
        self.assertTrue(h.scheduler.unblockNetwork(net))
        self.assertFalse(h.scheduler.unblockNetwork(net))
        h.submit("again", Job(user="x", kinds=API, model="m:latest", peer="10.1.2.3"))
        self.assertNotIn("again", h.failures)

    def test_maxQueued(self) -> None:
        """
        A per-user limit set at runtime applies at the next admission; L{None} goes back
        to the server-wide limit; a bad limit is refused.
        """
        h = self.h
        h.scheduler.setMaxQueued("alice", 1)
        h.submit("run", job("alice"))
        h.submit("q1", job("alice"))
        h.submit("q2", job("alice"))
        self.assertIsInstance(h.failures["q2"].value, TooManyRequests)
        h.scheduler.setMaxQueued("alice", None)
        h.submit("q3", job("alice"))
        self.assertNotIn("q3", h.failures)
        for bad in (0, -1, 1.5, True):
            self.assertRaises(ValueError, h.scheduler.setMaxQueued, "alice", bad)

    def test_resetPolicy(self) -> None:
        """
        Resetting a user sets the given values, unblocks it and lets it be forgotten when
        idle.
        """
        h = Harness(idleForget=10.0)
        h.scheduler.setPolicy("alice", priority="vip", weight=3)
        h.scheduler.setBlocked("alice", True)
        h.scheduler.resetPolicy("alice", priority="boost", weight=2, maxQueued=5)
        self.assertEqual(
            h.scheduler.user("alice"),
            {"id": "alice", "priority": "boost", "weight": 2.0, "max_queued": 5,
             "blocked": False, "queued": 0, "active": 0, "served": 0},
        )
        h.clock.advance(11)
        self.assertIsNone(h.scheduler.user("alice"))

    def test_queuedRequestsOrder(self) -> None:
        """
        The listing is in dispatch order with positions, ids, users, models, peers and
        waits; filtering by user keeps the global positions; it matches what is then
        dispatched.
        """
        h = self.h
        h.submit("run", job("alice"))
        for label, user in [("a1", "alice"), ("a2", "alice"), ("b1", "bob"), ("v1", "vip")]:
            h.submit(label, Job(user=user, kinds=API, model="m:latest", peer="10.0.0.1",
                                requestId=label))
        h.scheduler.setPolicy("vip", priority="vip")
        h.clock.advance(2)
        listing = h.scheduler.queuedRequests()
        self.assertEqual([r["id"] for r in listing], ["v1", "b1", "a1", "a2"])
        self.assertEqual([r["position"] for r in listing], [1, 2, 3, 4])
        self.assertEqual(listing[0], {"id": "v1", "position": 1, "user": "vip",
                                      "model": "m:latest", "waited": 2.0, "peer": "10.0.0.1"})
        self.assertEqual([(r["id"], r["position"]) for r in
                          h.scheduler.queuedRequests(user="alice")], [("a1", 3), ("a2", 4)])
        for _ in range(4):
            h.releaseNext()
        self.assertEqual(h.labels(), ["run", "v1", "b1", "a1", "a2"])

    def test_cancelQueued(self) -> None:
        """
        Cancelling a queued request by id fails it with a 503 and an event; unknown,
        running or already cancelled ids answer L{False}.
        """
        h = self.h
        h.submit("run", Job(user="a", kinds=API, model="m:latest", requestId="r0"))
        h.submit("wait", Job(user="a", kinds=API, model="m:latest", requestId="r1"))
        self.assertFalse(h.scheduler.cancelQueued("r0"))
        self.assertTrue(h.scheduler.cancelQueued("r1"))
        self.assertFalse(h.scheduler.cancelQueued("r1"))
        self.assertFalse(h.scheduler.cancelQueued("nope"))
        self.assertEqual(h.failures["wait"].value.code, "cancelled")
        self.assertEqual(h.scheduler.queued, 0)
        self.assertEqual(self.events[-1][1]["reason"], "operator")

    def test_generatedIds(self) -> None:
        """
        A job without a request id gets one, which cancels it.
        """
        h = self.h
        h.submit("run", job("a"))
        h.submit("wait", job("a"))
        [entry] = h.scheduler.queuedRequests()
        self.assertTrue(h.scheduler.cancelQueued(entry["id"]))
        self.assertIn("wait", h.failures)

    def test_events(self) -> None:
        """
        Queued, started, finished and client-cancelled requests are announced.
        """
        h = self.h
        h.submit("run", Job(user="a", kinds=API, model="m:latest", requestId="r0",
                            peer="10.0.0.1"))
        d = h.scheduler.enqueue(Job(user="a", kinds=API, model="m:latest", requestId="r1"))
        d.addErrback(lambda f: f.trap(CancelledError))
        h.clock.advance(3)
        d.cancel()
        h.releaseNext()
        self.assertEqual(
            [name for name, _ in self.events],
            ["request.queued", "request.started", "request.queued", "request.cancelled",
             "request.finished"],
        )
        self.assertEqual(self.events[0][1], {"id": "r0", "user": "a", "model": "m:latest",
                                             "peer": "10.0.0.1", "queued": 1})
        self.assertEqual(self.events[1][1]["backend"], "b0")
        self.assertEqual(self.events[3][1]["reason"], "client")
        self.assertEqual(self.events[4][1]["duration"], 3.0)

    def test_reconfigure(self) -> None:
        """
        A new config's users get their policy, users dropped from it become forgettable,
        queued requests and counters stay.
        """
        h = Harness(users={"old": UserConfig(priority="vip")}, idleForget=10.0)
        onlineBackend(h.pool, "b0")
        h.submit("run", job("x"))
        h.submit("wait", job("x"))
        h.scheduler.reconfigure(
            Config(users={"new": UserConfig(priority="boost", weight=3, maxQueued=7)},
                   idleForget=10.0)
        )
        self.assertEqual(h.scheduler.user("new")["priority"], "boost")
        self.assertEqual(h.scheduler.user("new")["max_queued"], 7)
        self.assertEqual(h.scheduler.queued, 1)
        h.clock.advance(11)
        self.assertIsNone(h.scheduler.user("old"))
        self.assertIsNotNone(h.scheduler.user("new"))
        h.releaseNext()
        self.assertEqual(h.labels(), ["run", "wait"])
