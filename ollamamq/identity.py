# -*- test-case-name: tests.test_identity -*-
"""
Who is asking: the user a request is queued and accounted under.

Rules, first match wins:

  1. A bearer key (C{Authorization: Bearer <key>}, or C{x-api-key: <key>} as Anthropic
     clients send it) that is one of the configured users' keys names that user
     (source C{"key"}).
  2. Else, when C{trust_user_header} is on, the C{X-User-ID} header names the user
     (source C{"header"}). The value is trimmed; it is ignored (the next rule applies) when
     it is empty, longer than L{MAX_USER_ID} characters, not UTF-8, contains control
     characters, starts with the reserved L{IP_PREFIX}, or names a configured user that has
     keys: such a user proves who they are with a key, so a header cannot borrow their
     priority.
  3. Else the client address (source C{"ip"}), as the user id C{"ip:<address>"}. The
     prefix keeps addresses and chosen names in separate namespaces, so nobody can send
     C{X-User-ID: 10.0.0.7} to share (or starve) that host's queue. C{X-Forwarded-For} is
     honoured only when the peer is one of C{trusted_proxies}; then the right-most address
     in the header that is not itself a trusted proxy is the client (addresses further
     left were written by the client and can be forged).

A bearer value that is not a configured key is not an identity: it may be meant for the
backend (an OpenAI client always sends some key). Whether a request without a valid key is
refused (401) is the HTTP layer's decision, not this module's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import attrs
from twisted.web.http_headers import Headers

from ollamamq.config import Config, IPNetwork

KEY = "key"
HEADER = "header"
IP = "ip"

IP_PREFIX = "ip:"
MAX_USER_ID = 128

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class Identity:
    """
    The user a request belongs to.

    @ivar user: the user id scheduling and accounting use.
    @ivar source: how it was found: L{KEY}, L{HEADER} or L{IP}.
    """

    user: str
    source: str


def _firstHeader(headers: Headers, name: bytes) -> str | None:
    """
    The first value of header C{name} as text, or L{None} when absent or not UTF-8.
    """
    values = headers.getRawHeaders(name)
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _bearer(value: str) -> str | None:
    """
    The credential of an C{Authorization} value using the C{Bearer} scheme (any case).
    """
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip() or None


def _hasControl(value: str) -> bool:
    """
    Whether C{value} contains a C0 or C1 control character or DEL.
    """
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)


def _parseAddress(text: str) -> IPAddress | None:
    """
    An address as found in C{X-Forwarded-For} or as a peer host, tolerating the
    C{[v6]:port} and C{v4:port} forms some proxies write. IPv4-mapped IPv6 addresses are
    returned as IPv4, so one host has one identity whatever socket family it came over.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class IdentityResolver:
    """
    Turns a request's headers and peer address into an L{Identity}; see the module
    docstring for the rules.
    """

    def __init__(self, config: Config) -> None:
        """
        @param config: supplies the users' keys, C{trustUserHeader}, C{trustedProxies} and
            the admin key (a proxy credential too, see L{isProxyCredential}).
        """
        self._keys: dict[str, str] = {}
        for userID, userConfig in config.users.items():
            for key in userConfig.keys:
                self._keys[key] = userID
        # Users that authenticate with keys may not be claimed through X-User-ID.
        self._keyed = frozenset(self._keys.values())
        self._adminKey = config.adminKey
        self._trustHeader = config.trustUserHeader
        self._proxies: tuple[IPNetwork, ...] = tuple(config.trustedProxies)

    def reconfigure(self, config: Config) -> None:
        """
        Take a reloaded config's keys, trust settings and admin key.
        """
        IdentityResolver.__init__(self, config)

    def identify(self, headers: Headers, peerHost: str) -> Identity:
        """
        Who sent a request.

        @param headers: the request headers.
        @param peerHost: the address of the TCP peer (C{request.getClientAddress().host}).
        """
        for key in self._presentedKeys(headers):
            user = self._keys.get(key)
            if user is not None:
                return Identity(user, KEY)
        if self._trustHeader:
            user = self._headerUser(headers)
            if user is not None:
                return Identity(user, HEADER)
        return Identity(IP_PREFIX + self._clientAddress(headers, peerHost), IP)

    def clientAddress(self, headers: Headers, peerHost: str) -> str:
        """
        The address of the client behind a request: the TCP peer, or the client a trusted
        proxy names in C{X-Forwarded-For} (rule 3 of the module docstring), whatever user
        the request names. Per-address limits count by it.
        """
        return self._clientAddress(headers, peerHost)

    def isProxyCredential(self, value: str) -> bool:
        """
        Whether C{value} (a bearer key, an C{x-api-key} value, or a whole
        C{Bearer <key>} header value) is one of the proxy's own credentials, a user key or
        the admin key, which the relay must strip rather than forward to a backend.
        """
        credential = _bearer(value) or value.strip()
        if not credential:
            return False
        return credential in self._keys or credential == self._adminKey

    def _presentedKeys(self, headers: Headers) -> Iterable[str]:
        """
        The credentials a request carries, C{Authorization} bearer first.
        """
        authorization = _firstHeader(headers, b"authorization")
        if authorization is not None:
            bearer = _bearer(authorization)
            if bearer is not None:
                yield bearer
        apiKey = _firstHeader(headers, b"x-api-key")
        if apiKey is not None and apiKey.strip():
            yield apiKey.strip()

    def _headerUser(self, headers: Headers) -> str | None:
        """
        The acceptable C{X-User-ID} value, or L{None}.
        """
        value = _firstHeader(headers, b"x-user-id")
        if value is None:
            return None
        value = value.strip()
        if (
            not value
            or len(value) > MAX_USER_ID
            or _hasControl(value)
            or value.lower().startswith(IP_PREFIX)
            or value in self._keyed
        ):
            return None
        return value

    def _trusted(self, address: IPAddress) -> bool:
        """
        Whether C{address} is one of the trusted proxies.
        """
        return any(address.version == net.version and address in net for net in self._proxies)

    def _clientAddress(self, headers: Headers, peerHost: str) -> str:
        """
        The client's address: the peer, or from C{X-Forwarded-For} when the peer is a
        trusted proxy.
        """
        peer = _parseAddress(peerHost)
        if peer is None:
            # Not an IP peer (a UNIX socket, a test transport): it is all we know.
            return peerHost
        if not self._trusted(peer):
            return str(peer)
        hops: list[str] = []
        for raw in headers.getRawHeaders(b"x-forwarded-for", []):
            hops.extend(raw.decode("latin-1").split(","))
        client = peer
        # Walk from the nearest hop outwards; each trusted hop vouches for the one to its
        # left. Stop at the first address that is not a trusted proxy: that is the client.
        for hop in reversed(hops):
            address = _parseAddress(hop)
            if address is None:
                # A trusted proxy wrote something that is no address: trust nothing
                # further left, and keep the last hop that was vouched for.
                break
            client = address
            if not self._trusted(address):
                break
        return str(client)
