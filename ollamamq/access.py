# -*- test-case-name: tests.test_access -*-
"""
The front door: the access rules every request passes before the route table.

In order:

  1. Credentials only where they belong. A request with more than one C{Authorization},
     C{x-api-key}, C{X-Admin-Key} or C{X-User-ID} header is refused (400
     C{repeated_header}): which of them would count is ambiguous, and the rules must not
     depend on the reading. A key in the query string (a parameter named like one, or any
     parameter whose value is one of the proxy's keys) is refused (400
     C{key_in_query}) with a hint to send it as a header: URLs end up in logs, histories
     and C{Referer}s.
  2. Authentication. With C{auth = "required"}, a request without a valid user key (or
     C{X-User-ID} from a trusted proxy, when trusted) gets a 401 in its route's dialect,
     with C{WWW-Authenticate: Bearer} (what the OpenAI and Anthropic SDKs read). The admin
     key passes too. Public routes need nothing: C{/}, C{/health} and C{/proxy/status}
     (which shows details to the admin only).
  3. Rate. The caller's C{max_requests_per_minute} bucket (L{ollamamq.limits}) gives one
     token per request to any route but the public ones; an empty bucket is a 429 with a
     truthful C{Retry-After} and the C{X-RateLimit-*} headers, which every rate-checked
     answer carries. The admin is not rate limited.

Everything refused here costs no queue entry, no backend call and no slot.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from ollamamq.errors import BadRequest, ProxyError, writeError
from ollamamq.front import familyFor
from ollamamq.identity import IdentityResolver
from ollamamq.limits import RateLimiter, TokenBudget

# Routes anyone may ask, authenticated or not, without using up their rate. The status
# page is static and reads only the (redacted without the admin key) /proxy/status.
PUBLIC = frozenset({b"/", b"/health", b"/proxy/status", b"/proxy/ui"})

# Headers that carry identity or credentials: exactly one of each, or none.
SINGLE = (b"authorization", b"x-api-key", b"x-admin-key", b"x-user-id")

# Query parameters that clients (and other APIs) use for keys.
KEY_PARAMETERS = frozenset({
    "key", "api_key", "apikey", "api-key", "x-api-key", "access_token", "token", "auth",
    "authorization", "admin_key",
})


def peerHost(request: IRequest) -> str:
    """
    The TCP peer's address, or C{"local"} for a transport without one.
    """
    return getattr(request.getClientAddress(), "host", None) or "local"


class AccessGate(Resource):
    """
    Applies the rules of the module docstring, then hands the request to C{inner}.
    """

    isLeaf = True

    def __init__(self, inner: Any, identity: IdentityResolver, limiter: RateLimiter,
                 public: frozenset[bytes] = PUBLIC, budget: TokenBudget | None = None) -> None:
        """
        @param inner: the resource serving requests that pass.
        @param identity: who is asking, and whether that is proven.
        @param limiter: the per-user request-rate buckets.
        @param public: the paths anyone may ask (L{PUBLIC}, plus C{/metrics} when metrics
            are public).
        @param budget: the per-user tokens per day.
        """
        super().__init__()
        self._inner = inner
        self._identity = identity
        self._limiter = limiter
        self._public = public
        self._budget = budget

    def render(self, request: IRequest) -> Any:
        """
        Refuse the request here, shaped, or pass it on.
        """
        try:
            self._check(request)
        except ProxyError as error:
            return self._refuse(request, error)
        return self._inner.render(request)

    def _check(self, request: IRequest) -> None:
        """
        Raise the L{ProxyError} that refuses C{request}, if any; set the rate headers.
        """
        headers = request.requestHeaders
        for name in SINGLE:
            if len(headers.getRawHeaders(name, [])) > 1:
                raise BadRequest(
                    f"the {name.decode('ascii')} header is given more than once; send it once",
                    code="repeated_header",
                )
        self._checkQuery(request)
        public = request.path in self._public
        if public or self._identity.isAdmin(headers):
            return
        who = self._identity.authenticate(headers, peerHost(request))
        if self._budget is not None:
            self._budget.check(who.user)
        state = self._limiter.check(who.user)
        if state is not None:
            for name, value in state.headers().items():
                request.setHeader(name, value)

    def _checkQuery(self, request: IRequest) -> None:
        """
        Refuse a key sent in the query string.
        """
        _, _, query = request.uri.partition(b"?")
        if not query:
            return
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if name.lower() in KEY_PARAMETERS or (
                value and self._identity.isProxyCredential(value)
            ):
                raise BadRequest(
                    f"a key was sent in the query string (parameter {name!r}); query "
                    "strings end up in logs: send it as \"Authorization: Bearer <key>\" "
                    "(or x-api-key) instead, and consider this key leaked",
                    code="key_in_query",
                )

    def _refuse(self, request: IRequest, error: ProxyError) -> bytes:
        """
        The shaped answer for a refused request.
        """
        body = writeError(request, error, familyFor(request.path))
        return b"" if request.method == b"HEAD" else body
