# -*- test-case-name: tests.test_limits -*-
"""
Per-user limits: a token bucket of requests per user, and a budget of tokens per day.

A user with a limit of C{N} requests per minute (C{max_requests_per_minute}, server-wide
in C{[server]} or per user in C{[users.NAME]}) has a bucket that holds at most C{N} tokens
and refills continuously at C{N / 60} tokens per second; it starts full. Each request
takes one token; a request that finds less than one is refused with a 429 whose
C{Retry-After} is the time until one token is there again, rounded up to whole seconds,
so a client that waits exactly that long is served. So a user may burst C{N} requests at
once, then C{N} per minute at a steady pace.

Every checked response carries C{X-RateLimit-Limit} (C{N}), C{X-RateLimit-Remaining}
(whole tokens left after this request) and C{X-RateLimit-Reset} (seconds until the bucket
is full again, rounded up).

A full bucket is the same as no bucket, so buckets of users that have been quiet long
enough to refill are dropped: memory stays proportional to the users active in the last
minute, however many addresses a client sends from.

Tokens per day (C{max_tokens_per_day}, server-wide or per user): the prompt and
completion tokens of a user's finished requests, as usage accounting reads them from the
answers (L{ollamamq.usage}), are added up per UTC day. Once a user has used the day's
budget, new requests get a 429 (code C{token_budget_exhausted}) whose C{Retry-After} is
the time until the next UTC midnight, when every budget starts over. A request already
admitted runs to its end, so a day's use can pass the budget by the last requests' size.
Requests whose backend reported no counts are not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime

from ollamamq.config import Config
from ollamamq.errors import TooManyRequests

# Float slack (in tokens and seconds), so that float error neither adds a second to the
# advertised Retry-After nor makes waiting exactly that long fall short.
_EPSILON = 1e-6

# Buckets kept before the first sweep for full ones.
_SWEEP_MIN = 1024


@attrs.define
class _Bucket:
    """
    One user's tokens as of C{updated}.
    """

    tokens: float
    updated: float


@attrs.frozen
class RateState:
    """
    What a checked request leaves of its user's limit, for the response headers.

    @ivar limit: requests per minute.
    @ivar remaining: whole requests the user may make at once now.
    @ivar reset: seconds until the bucket is full again.
    """

    limit: int
    remaining: int
    reset: float

    def headers(self) -> dict[bytes, bytes]:
        """
        The C{X-RateLimit-*} headers describing this state.
        """
        return {
            b"x-ratelimit-limit": b"%d" % self.limit,
            b"x-ratelimit-remaining": b"%d" % self.remaining,
            b"x-ratelimit-reset": b"%d" % math.ceil(self.reset - _EPSILON),
        }


class RateLimiter:
    """
    The token buckets of all users with a C{max_requests_per_minute}.
    """

    def __init__(self, clock: IReactorTime, config: Config) -> None:
        """
        @param clock: the time source refills are computed from.
        @param config: the server-wide C{maxRequestsPerMinute} and the users' own.
        """
        self._clock = clock
        self._default = config.maxRequestsPerMinute
        self._limits = {
            userID: userConfig.maxRequestsPerMinute
            for userID, userConfig in config.users.items()
            if userConfig.maxRequestsPerMinute is not None
        }
        self._buckets: dict[str, _Bucket] = {}
        self._sweepAt = _SWEEP_MIN

    def limitFor(self, user: str) -> int | None:
        """
        C{user}'s requests per minute, or L{None} when unlimited.
        """
        return self._limits.get(user, self._default)

    def check(self, user: str) -> RateState | None:
        """
        Take one token from C{user}'s bucket for a request.

        @return: the state left, or L{None} when the user has no limit.
        @raise TooManyRequests: (code C{rate_limited}) when the bucket holds less than one
            token; its C{retryAfter} is the time until it does and its C{headers} the
            C{X-RateLimit-*} headers.
        """
        limit = self.limitFor(user)
        if limit is None:
            return None
        now = self._clock.seconds()
        rate = limit / 60.0
        bucket = self._buckets.get(user)
        if bucket is None:
            self._sweep(now)
            bucket = self._buckets[user] = _Bucket(float(limit), now)
        else:
            bucket.tokens = min(float(limit), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens + _EPSILON < 1.0:
            state = RateState(limit, 0, (limit - bucket.tokens) / rate)
            error = TooManyRequests(
                f"rate limit of {limit} requests per minute reached for user {user}",
                code="rate_limited",
                retryAfter=max(0.0, (1.0 - bucket.tokens) / rate - _EPSILON),
            )
            error.headers.update(state.headers())
            raise error
        bucket.tokens = max(0.0, bucket.tokens - 1.0)
        return RateState(
            limit, int(bucket.tokens + _EPSILON), (limit - bucket.tokens) / rate
        )

    def _sweep(self, now: float) -> None:
        """
        Drop buckets that have refilled (the same as having none) once there are many.
        """
        if len(self._buckets) < self._sweepAt:
            return
        for user, bucket in list(self._buckets.items()):
            limit = self.limitFor(user)
            if limit is None or bucket.tokens + (now - bucket.updated) * limit / 60.0 >= limit:
                del self._buckets[user]
        self._sweepAt = max(_SWEEP_MIN, 2 * len(self._buckets))

    @property
    def tracked(self) -> int:
        """
        How many buckets are held (for tests and metrics).
        """
        return len(self._buckets)


_DAY = 86400.0


class TokenBudget:
    """
    Tokens used per user in the current UTC day, against C{max_tokens_per_day}.
    """

    def __init__(self, config: Config, wallClock: Callable[[], float] = time.time) -> None:
        """
        @param config: the server-wide C{maxTokensPerDay} and the users' own.
        @param wallClock: Unix time (days are UTC days).
        """
        self._wallClock = wallClock
        self._day = -1
        self._used: dict[str, int] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """
        Take the limits of a reloaded config; what was used today stays counted.
        """
        self._default = config.maxTokensPerDay
        self._limits = {
            userID: userConfig.maxTokensPerDay
            for userID, userConfig in config.users.items()
            if userConfig.maxTokensPerDay is not None
        }

    def limitFor(self, user: str) -> int | None:
        """
        C{user}'s tokens per day, or L{None} when unlimited.
        """
        return self._limits.get(user, self._default)

    def _today(self) -> float:
        """
        Start a new day's counts when the UTC day changed; return the current time.
        """
        now = self._wallClock()
        day = int(now // _DAY)
        if day != self._day:
            self._day = day
            self._used.clear()
        return now

    def used(self, user: str) -> int:
        """
        Tokens C{user} used today.
        """
        self._today()
        return self._used.get(user, 0)

    def charge(self, user: str, tokens: int) -> None:
        """
        Count a finished request's tokens (only users with a budget are tracked, so
        memory follows the budgeted users, not everyone).
        """
        self._today()
        if tokens > 0 and self.limitFor(user) is not None:
            self._used[user] = self._used.get(user, 0) + tokens

    def check(self, user: str) -> None:
        """
        Refuse a new request of a user who used the day's budget.

        @raise TooManyRequests: (code C{token_budget_exhausted}) with C{Retry-After} the
            seconds until the next UTC midnight and the C{X-RateLimit-*} headers counted
            in tokens.
        """
        limit = self.limitFor(user)
        if limit is None:
            return
        now = self._today()
        used = self._used.get(user, 0)
        if used < limit:
            return
        reset = (self._day + 1) * _DAY - now
        error = TooManyRequests(
            f"user {user} used the {limit} tokens a day allowed; the budget starts over at "
            "midnight UTC",
            code="token_budget_exhausted",
            retryAfter=reset,
        )
        error.headers.update(RateState(limit, 0, reset).headers())
        raise error
