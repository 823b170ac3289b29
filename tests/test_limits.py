# -*- test-case-name: tests.test_limits -*-
"""
Tests for L{ollamamq.limits}: the per-user token bucket on a L{task.Clock}.
"""

from __future__ import annotations

import math

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.config import Config, UserConfig
from ollamamq.errors import TooManyRequests
from ollamamq.limits import RateLimiter, RateState, TokenBudget


def limiter(clock: Clock, default: int | None = None, **perUser: int) -> RateLimiter:
    """
    A limiter with a server-wide C{default} and per-user limits.
    """
    users = {name: UserConfig(maxRequestsPerMinute=n) for name, n in perUser.items()}
    return RateLimiter(clock, Config(maxRequestsPerMinute=default, users=users))


class BucketTests(SynchronousTestCase):
    """
    The bucket bursts to its limit, then refills at limit / 60 per second.
    """

    def test_unlimited(self) -> None:
        """
        Without a limit nothing is counted or refused.
        """
        r = limiter(Clock())
        for _ in range(1000):
            self.assertIsNone(r.check("alice"))
        self.assertEqual(r.tracked, 0)

    def test_burstThenRefuse(self) -> None:
        """
        A full bucket allows C{limit} requests at once, counting down C{Remaining}; the
        next is refused with 429 C{rate_limited} and the C{X-RateLimit-*} headers.
        """
        clock = Clock()
        r = limiter(clock, default=6)
        remaining = [r.check("alice").remaining for _ in range(6)]
        self.assertEqual(remaining, [5, 4, 3, 2, 1, 0])
        e = self.assertRaises(TooManyRequests, r.check, "alice")
        self.assertEqual((e.status, e.code), (429, "rate_limited"))
        # 6 per minute: one token every 10 seconds.
        self.assertAlmostEqual(e.retryAfter, 10.0, places=5)
        self.assertEqual(e.headers[b"x-ratelimit-limit"], b"6")
        self.assertEqual(e.headers[b"x-ratelimit-remaining"], b"0")
        self.assertEqual(e.headers[b"x-ratelimit-reset"], b"60")
        # Users have separate buckets.
        self.assertEqual(r.check("bob").remaining, 5)

    def test_refill(self) -> None:
        """
        Tokens come back at limit / 60 per second, never beyond the limit.
        """
        clock = Clock()
        r = limiter(clock, default=60)
        for _ in range(60):
            r.check("alice")
        clock.advance(0.5)
        self.assertRaises(TooManyRequests, r.check, "alice")
        clock.advance(0.5)
        self.assertEqual(r.check("alice").remaining, 0)
        clock.advance(30)
        self.assertEqual(r.check("alice").remaining, 29)
        clock.advance(3600)
        self.assertEqual(r.check("alice").remaining, 59)

    def test_retryAfterIsTruthful(self) -> None:
        """
        C{Retry-After} is the time until the next request is allowed, within a second:
        refused until just before it, allowed at it.
        """
        clock = Clock()
        r = limiter(clock, default=7)
        for step in [0.0, 1.3, 2.9, 0.1, 8.6, 0.0, 4.4]:
            clock.advance(step)
            while True:
                try:
                    r.check("alice")
                except TooManyRequests as e:
                    wait = e.retryAfter
                    break
            header = math.ceil(wait)
            self.assertLessEqual(header - wait, 1.0)
            clock.advance(wait - 0.01)
            self.assertRaises(TooManyRequests, r.check, "alice")
            clock.advance(0.01)
            self.assertIsInstance(r.check("alice"), RateState)

    def test_resetHeader(self) -> None:
        """
        C{X-RateLimit-Reset} is the time until the bucket is full again.
        """
        clock = Clock()
        r = limiter(clock, default=60)
        state = r.check("alice")
        self.assertEqual(state.headers()[b"x-ratelimit-reset"], b"1")
        for _ in range(9):
            state = r.check("alice")
        self.assertEqual(state.headers(), {b"x-ratelimit-limit": b"60",
                                           b"x-ratelimit-remaining": b"50",
                                           b"x-ratelimit-reset": b"10"})

    def test_perUserOverride(self) -> None:
        """
        A user's own limit overrides the server-wide one, which applies to everyone else
        (addresses included).
        """
        clock = Clock()
        r = limiter(clock, default=2, alice=5)
        self.assertEqual(r.limitFor("alice"), 5)
        self.assertEqual(r.limitFor("ip:10.0.0.1"), 2)
        self.assertEqual([r.check("alice").remaining for _ in range(5)], [4, 3, 2, 1, 0])
        r.check("ip:10.0.0.1")
        r.check("ip:10.0.0.1")
        self.assertRaises(TooManyRequests, r.check, "ip:10.0.0.1")
        only = limiter(clock, alice=1)
        self.assertIsNone(only.check("bob"))
        only.check("alice")
        self.assertRaises(TooManyRequests, only.check, "alice")

    def test_memoryBounded(self) -> None:
        """
        Buckets that refilled are dropped, so many one-off users (a client rotating
        addresses) leave memory proportional to those active in the last minute.
        """
        clock = Clock()
        r = limiter(clock, default=60)
        for i in range(5000):
            r.check(f"ip:10.0.{i // 256}.{i % 256}")
            clock.advance(0.01)
        # Each bucket is full again a second after its one request.
        self.assertLess(r.tracked, 1200)
        clock.advance(2)
        for i in range(2000):
            r.check(f"user{i}")
        self.assertLessEqual(r.tracked, 2100)


class TokenBudgetTests(SynchronousTestCase):
    """
    L{TokenBudget}: tokens per user per UTC day, from finished requests.
    """

    def budget(self, now: list[float], **users: int) -> TokenBudget:
        config = Config(maxTokensPerDay=100,
                        users={u: UserConfig(maxTokensPerDay=n) for u, n in users.items()})
        return TokenBudget(config, wallClock=lambda: now[0])

    def test_usedUpThenMidnight(self) -> None:
        """
        A user who used the day's budget is refused with a 429 whose Retry-After is the
        time until midnight UTC; at midnight every budget starts over.
        """
        now = [86400.0 * 20000 + 3600.0 * 23]  # 23:00 UTC
        budget = self.budget(now)
        budget.check("a")
        budget.charge("a", 60)
        budget.check("a")
        budget.charge("a", 50)
        with self.assertRaises(TooManyRequests) as caught:
            budget.check("a")
        error = caught.exception
        self.assertEqual((error.status, error.code), (429, "token_budget_exhausted"))
        self.assertEqual(error.retryAfter, 3600.0)
        self.assertEqual(error.headers[b"x-ratelimit-limit"], b"100")
        self.assertEqual(error.headers[b"x-ratelimit-remaining"], b"0")
        budget.check("b")
        now[0] += 3600.0
        budget.check("a")
        self.assertEqual(budget.used("a"), 0)

    def test_perUserLimitAndUnlimited(self) -> None:
        """
        A user's own limit overrides the server-wide one; with none at all nothing is
        tracked.
        """
        now = [0.0]
        budget = self.budget(now, small=10)
        budget.charge("small", 10)
        self.assertRaises(TooManyRequests, budget.check, "small")
        budget.check("other")
        free = TokenBudget(Config(), wallClock=lambda: now[0])
        free.charge("x", 10**9)
        free.check("x")
        self.assertEqual(free.used("x"), 0)
