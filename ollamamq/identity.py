# -*- test-case-name: tests.test_identity -*-
"""
Who is asking: the user a request is queued and accounted under, and whether that is
proven.

Rules, first match wins:

  1. A key the request presents (L{presentedKey}: C{Authorization: Bearer <key>}, a bare
     C{Authorization: <key>}, or C{x-api-key: <key>} as Anthropic clients send it) that is
     one of the users' keys names that user (source C{"key"}, authenticated). Keys are
     configured in the clear or as C{sha256:HEX}, or minted at runtime (stored as digests
     only). A presented key is hashed before anything is compared, so neither the stored
     form nor the timing of a lookup reveals a key (the admin key, a single secret, is
     compared with C{hmac.compare_digest}).
  2. Else, when C{trust_user_header} is on, the C{X-User-ID} header names the user
     (source C{"header"}). The value is trimmed; it is ignored (the next rule applies) when
     it is empty, longer than L{MAX_USER_ID} characters, not UTF-8, contains control
     characters, starts with the reserved L{IP_PREFIX}, or names a user that has keys:
     such a user proves who they are with a key, so a header cannot borrow their priority.
     From a trusted proxy (C{trusted_proxies}) the header names the end user behind it,
     whom that proxy authenticated: it counts as authenticated. From any other peer it is
     a name only, and with C{auth = "required"} it is not honoured at all.
  3. Else the client address (source C{"ip"}), as the user id C{"ip:<address>"}. The
     prefix keeps addresses and chosen names in separate namespaces, so nobody can send
     C{X-User-ID: 10.0.0.7} to share (or starve) that host's queue. C{X-Forwarded-For} is
     honoured only when the peer is one of C{trusted_proxies}; then the right-most address
     in the header that is not itself a trusted proxy is the client (addresses further
     left were written by the client and can be forged).

With C{auth = "optional"} (the default) every request has an identity. With
C{auth = "required"}, L{IdentityResolver.authenticate} refuses one that is not
authenticated (no key, an unknown key, a name only) with L{Unauthorized}.

A bearer value that is not one of the proxy's keys is not an identity: with optional auth
it may be meant for the backend (an OpenAI client always sends some key) and is forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

import attrs
from twisted.web.http_headers import Headers

from ollamamq.config import Config, IPNetwork, keyDigest
from ollamamq.errors import Unauthorized

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
    @ivar authenticated: whether it is proven: a user key, or C{X-User-ID} set by a
        trusted proxy.
    """

    user: str
    source: str
    authenticated: bool = False


def _digestOf(credential: str) -> bytes:
    """
    The SHA-256 digest of a presented credential, the form keys are compared in.
    """
    return hashlib.sha256(credential.encode("utf-8")).digest()


def _digestBytes(configured: str) -> bytes:
    """
    The raw digest of a configured key (in the clear or C{sha256:HEX}).
    """
    return bytes.fromhex(keyDigest(configured).partition(":")[2])


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


def credentialsIn(value: str) -> list[str]:
    """
    The credentials an C{Authorization} or C{x-api-key} value may carry: the C{Bearer}
    credential, or the whole value when it is a single token (Ollama-style clients and
    C{x-api-key} send the bare key).
    """
    bearer = _bearer(value)
    if bearer is not None:
        return [bearer]
    value = value.strip()
    if value and " " not in value:
        return [value]
    return []


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
    docstring for the rules. Holds the users' keys, as digests: those of the config and
    those minted at runtime (L{addKey}, L{removeKey}).
    """

    def __init__(self, config: Config) -> None:
        """
        @param config: supplies the users' keys, C{auth}, C{trustUserHeader},
            C{trustedProxies} and the admin key (a proxy credential too, see
            L{isProxyCredential}).
        """
        # Digest -> user: keys are never held in the clear.
        self._keys: dict[bytes, str] = {}
        self._keyCounts: dict[str, int] = {}
        for userID, userConfig in config.users.items():
            for key in userConfig.keys:
                self.addKey(userID, _digestBytes(key))
        # The config's own digests, told apart from runtime ones on a reload.
        self._configured = frozenset(self._keys)
        self._adminDigest = _digestOf(config.adminKey) if config.adminKey else None
        self._required = config.auth == "required"
        self._trustHeader = config.trustUserHeader
        self._proxies: tuple[IPNetwork, ...] = tuple(config.trustedProxies)

    @property
    def required(self) -> bool:
        """
        Whether requests must be authenticated (C{auth = "required"}).
        """
        return self._required

    def addKey(self, user: str, digest: bytes) -> None:
        """
        Let the key whose SHA-256 digest is C{digest} authenticate as C{user}, from now on.
        """
        previous = self._keys.get(digest)
        if previous is not None:
            self._forget(previous)
        self._keys[digest] = user
        self._keyCounts[user] = self._keyCounts.get(user, 0) + 1

    def removeKey(self, digest: bytes) -> None:
        """
        Stop accepting the key whose digest is C{digest}, from now on.
        """
        user = self._keys.pop(digest, None)
        if user is not None:
            self._forget(user)

    def _forget(self, user: str) -> None:
        """
        Count one key of C{user} less.
        """
        left = self._keyCounts[user] - 1
        if left:
            self._keyCounts[user] = left
        else:
            del self._keyCounts[user]

    def hasKeys(self, user: str) -> bool:
        """
        Whether C{user} has keys (then only a key proves to be them).
        """
        return user in self._keyCounts

    def reconfigure(self, config: Config) -> None:
        """
        Take a reloaded config's keys, trust settings and admin key. Keys minted at runtime
        (added with L{addKey} after construction) are kept: they live in the state file,
        not in the config.
        """
        runtime = {d: u for d, u in self._keys.items() if d not in self._configured}
        IdentityResolver.__init__(self, config)
        for digest, user in runtime.items():
            self.addKey(user, digest)


    def identify(self, headers: Headers, peerHost: str) -> Identity:
        """
        Who sent a request.

        @param headers: the request headers.
        @param peerHost: the address of the TCP peer (C{request.getClientAddress().host}).
        """
        for key in self._presentedKeys(headers):
            user = self._userFor(key)
            if user is not None:
                return Identity(user, KEY, True)
        peer = _parseAddress(peerHost)
        fromProxy = peer is not None and self._trusted(peer)
        if self._trustHeader and (fromProxy or not self._required):
            user = self._headerUser(headers)
            if user is not None:
                return Identity(user, HEADER, fromProxy)
        return Identity(IP_PREFIX + self._clientAddress(headers, peerHost), IP)

    def authenticate(self, headers: Headers, peerHost: str) -> Identity:
        """
        Who sent a request, refusing it when authentication is required and not given.

        @raise Unauthorized: with C{auth = "required"}, for a request with no valid key
            (and no C{X-User-ID} from a trusted proxy).
        """
        who = self.identify(headers, peerHost)
        if self._required and not who.authenticated:
            if any(True for _ in self._presentedKeys(headers)):
                message = "the API key is not valid"
                code = "invalid_api_key"
            else:
                message = ("an API key is required: send it as \"Authorization: Bearer "
                           "<key>\" (or x-api-key)")
                code = "missing_api_key"
            raise Unauthorized(message, code=code)
        return who

    def isAdmin(self, headers: Headers) -> bool:
        """
        Whether a request carries the admin key (C{Authorization: Bearer} or
        C{X-Admin-Key}). Always false when no admin key is configured.
        """
        if self._adminDigest is None:
            return False
        given = [v.decode("latin-1").strip()
                 for v in headers.getRawHeaders(b"x-admin-key", [])]
        for value in headers.getRawHeaders(b"authorization", []):
            # Only as a bearer token: a bare Authorization value is a user key's form.
            bearer = _bearer(value.decode("latin-1"))
            if bearer is not None:
                given.append(bearer)
        # Every candidate compared, in constant time each: no early exit on a match.
        found = False
        for credential in given:
            found |= hmac.compare_digest(_digestOf(credential), self._adminDigest)
        return found

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
        for credential in credentialsIn(value):
            if self._userFor(credential) is not None:
                return True
            if self._adminDigest is not None and hmac.compare_digest(
                _digestOf(credential), self._adminDigest
            ):
                return True
        return False

    def _userFor(self, credential: str) -> str | None:
        """
        The user whose key C{credential} is, or L{None}.
        """
        # Looked up by digest: whatever timing the lookup has depends on the SHA-256 of
        # the guess, which tells an attacker nothing about any stored key.
        return self._keys.get(_digestOf(credential))

    def _presentedKeys(self, headers: Headers) -> Iterable[str]:
        """
        The credentials a request carries, C{Authorization} first.
        """
        for name in (b"authorization", b"x-api-key"):
            value = _firstHeader(headers, name)
            if value is not None:
                yield from credentialsIn(value)

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
            or self.hasKeys(value)
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
