# -*- test-case-name: tests.test_limits -*-
"""
Per-user request-rate limits: a token bucket per user.

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
"""

from __future__ import annotations

import math

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
