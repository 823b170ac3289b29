# -*- test-case-name: tests.test_identity -*-
"""
Tests for L{ollamamq.identity}: bearer keys, C{X-User-ID}, client addresses and their
precedence.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from ollamamq.config import Config, UserConfig
from ollamamq.identity import HEADER, IP, KEY, Identity, IdentityResolver


def headers(**values: str | list[str]) -> Headers:
    """
    Request headers from keyword arguments (underscores become dashes).
    """
    h = Headers()
    for name, value in values.items():
        raw = value if isinstance(value, list) else [value]
        h.setRawHeaders(name.replace("_", "-").encode("ascii"), [v.encode("utf-8") for v in raw])
    return h


def resolver(**fields: object) -> IdentityResolver:
    """
    A resolver for a config with users alice (keyed), bob (keyed, two keys) and carol
    (configured, no keys), plus C{fields}.
    """
    users = {
        "alice": UserConfig(keys=("sk-alice",)),
        "bob": UserConfig(keys=("sk-bob-1", "sk-bob-2")),
        "carol": UserConfig(priority="vip"),
    }
    return IdentityResolver(Config(users=users, adminKey="admin-secret", **fields))  # type: ignore[arg-type]


class KeyTests(SynchronousTestCase):
    """
    Rule 1: a configured bearer key names its user.
    """

    def test_bearer(self) -> None:
        """
        C{Authorization: Bearer <key>} with a configured key identifies its user.
        """
        self.assertEqual(
            resolver().identify(headers(authorization="Bearer sk-bob-2"), "10.0.0.1"),
            Identity("bob", KEY),
        )

    def test_bearerSchemeCaseAndSpaces(self) -> None:
        """
        The scheme is case-insensitive and surrounding whitespace is ignored.
        """
        self.assertEqual(
            resolver().identify(headers(authorization="  bearer   sk-alice "), "10.0.0.1"),
            Identity("alice", KEY),
        )

    def test_xApiKey(self) -> None:
        """
        C{x-api-key}, as Anthropic clients send it, works like a bearer key.
        """
        self.assertEqual(
            resolver().identify(headers(x_api_key="sk-alice"), "10.0.0.1"),
            Identity("alice", KEY),
        )

    def test_foreignBearerFallsThrough(self) -> None:
        """
        A bearer that is not a configured key (say an OpenAI key meant for the backend) is
        not an identity; an C{x-api-key} with a configured key still is.
        """
        r = resolver()
        self.assertEqual(
            r.identify(headers(authorization="Bearer sk-openai-xyz"), "10.0.0.1"),
            Identity("ip:10.0.0.1", IP),
        )
        self.assertEqual(
            r.identify(
                headers(authorization="Bearer sk-openai-xyz", x_api_key="sk-bob-1"), "10.0.0.1"
            ),
            Identity("bob", KEY),
        )

    def test_otherSchemeIgnored(self) -> None:
        """
        A configured key under another scheme (Basic) is not taken as a bearer key.
        """
        self.assertEqual(
            resolver().identify(headers(authorization="Basic sk-alice"), "10.0.0.1"),
            Identity("ip:10.0.0.1", IP),
        )

    def test_adminKeyIsNoUser(self) -> None:
        """
        The admin key authenticates admin routes; it names no user.
        """
        self.assertEqual(
            resolver().identify(headers(authorization="Bearer admin-secret"), "10.0.0.1"),
            Identity("ip:10.0.0.1", IP),
        )

    def test_keyBeatsHeader(self) -> None:
        """
        A configured key wins over C{X-User-ID}.
        """
        self.assertEqual(
            resolver().identify(
                headers(authorization="Bearer sk-alice", x_user_id="mallory"), "10.0.0.1"
            ),
            Identity("alice", KEY),
        )


class HeaderTests(SynchronousTestCase):
    """
    Rule 2: a trusted C{X-User-ID}.
    """

    def test_header(self) -> None:
        """
        C{X-User-ID} names the user, trimmed.
        """
        self.assertEqual(
            resolver().identify(headers(x_user_id="  dave "), "10.0.0.1"),
            Identity("dave", HEADER),
        )

    def test_configuredUserWithoutKeys(self) -> None:
        """
        A configured user without keys can be named by the header (that is how
        header-trusting setups give users priorities).
        """
        self.assertEqual(
            resolver().identify(headers(x_user_id="carol"), "10.0.0.1"),
            Identity("carol", HEADER),
        )

    def test_untrusted(self) -> None:
        """
        With C{trust_user_header = false} the header is ignored.
        """
        self.assertEqual(
            resolver(trustUserHeader=False).identify(headers(x_user_id="dave"), "10.0.0.1"),
            Identity("ip:10.0.0.1", IP),
        )

    def test_badValues(self) -> None:
        """
        Empty, overlong, control-character, non-UTF-8 and C{ip:}-prefixed values fall
        through to the address, as does a header naming a user who has keys.
        """
        r = resolver()
        fallback = Identity("ip:10.0.0.1", IP)
        for value in ["", "   ", "x" * 129, "a\tb", "a\x7fb", "a\u0085b", "ip:10.9.9.9",
                      "IP:1.2.3.4", "alice"]:
            self.assertEqual(r.identify(headers(x_user_id=value), "10.0.0.1"), fallback, value)
        raw = Headers({b"x-user-id": [b"\xff\xfe"]})
        self.assertEqual(r.identify(raw, "10.0.0.1"), fallback)

    def test_longestAccepted(self) -> None:
        """
        128 characters, non-ASCII included, are accepted.
        """
        value = "é" * 128
        self.assertEqual(
            resolver().identify(headers(x_user_id=value), "10.0.0.1"), Identity(value, HEADER)
        )


class AddressTests(SynchronousTestCase):
    """
    Rule 3: the client address, from C{X-Forwarded-For} only behind a trusted proxy.
    """

    def test_peer(self) -> None:
        """
        Without headers the peer address is the user, as C{ip:<address>}.
        """
        self.assertEqual(resolver().identify(Headers(), "192.0.2.7"), Identity("ip:192.0.2.7", IP))

    def test_untrustedForwardedFor(self) -> None:
        """
        C{X-Forwarded-For} from a peer that is not a trusted proxy is ignored.
        """
        self.assertEqual(
            resolver().identify(headers(x_forwarded_for="203.0.113.5"), "192.0.2.7"),
            Identity("ip:192.0.2.7", IP),
        )

    def test_trustedForwardedFor(self) -> None:
        """
        From a trusted proxy (127.0.0.1 by default) the forwarded address is the client.
        """
        self.assertEqual(
            resolver().identify(headers(x_forwarded_for="203.0.113.5"), "127.0.0.1"),
            Identity("ip:203.0.113.5", IP),
        )

    def test_rightmostUntrusted(self) -> None:
        """
        The right-most address that is not a trusted proxy is the client: addresses further
        left were written by the client and may be forged. Several header lines count as
        one list.
        """
        r = resolver(trustedProxies=(ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(
            r.identify(
                headers(x_forwarded_for=["1.1.1.1, 203.0.113.5", "10.1.1.1 , 10.2.2.2"]),
                "10.0.0.1",
            ),
            Identity("ip:203.0.113.5", IP),
        )

    def test_allTrusted(self) -> None:
        """
        When every forwarded address is a trusted proxy, the left-most one is the client.
        """
        r = resolver(trustedProxies=(ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(
            r.identify(headers(x_forwarded_for="10.3.3.3, 10.2.2.2"), "10.0.0.1"),
            Identity("ip:10.3.3.3", IP),
        )

    def test_garbageHop(self) -> None:
        """
        A forwarded entry that is no address stops the walk at the last vouched-for hop.
        """
        r = resolver(trustedProxies=(ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(
            r.identify(headers(x_forwarded_for="203.0.113.5, unknown, 10.2.2.2"), "10.0.0.1"),
            Identity("ip:10.2.2.2", IP),
        )
        self.assertEqual(
            r.identify(headers(x_forwarded_for="unknown"), "10.0.0.1"),
            Identity("ip:10.0.0.1", IP),
        )

    def test_portsAndIPv6(self) -> None:
        """
        C{v4:port} and C{[v6]:port} forms are understood; IPv6 is normalised and an
        IPv4-mapped peer is the IPv4 host.
        """
        r = resolver(
            trustedProxies=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
        )
        self.assertEqual(
            r.identify(headers(x_forwarded_for="203.0.113.5:4711"), "127.0.0.1"),
            Identity("ip:203.0.113.5", IP),
        )
        self.assertEqual(
            r.identify(headers(x_forwarded_for="[2001:DB8::0001]:443"), "::1"),
            Identity("ip:2001:db8::1", IP),
        )
        self.assertEqual(r.identify(Headers(), "::ffff:192.0.2.7"), Identity("ip:192.0.2.7", IP))

    def test_headerBeatsAddress(self) -> None:
        """
        A trusted C{X-User-ID} wins over the address.
        """
        self.assertEqual(
            resolver().identify(
                headers(x_user_id="dave", x_forwarded_for="203.0.113.5"), "127.0.0.1"
            ),
            Identity("dave", HEADER),
        )

    def test_nonIPPeer(self) -> None:
        """
        A peer that is not an IP address (a UNIX socket) is used as it is.
        """
        self.assertEqual(
            resolver().identify(headers(x_forwarded_for="203.0.113.5"), "/run/s.sock"),
            Identity("ip:/run/s.sock", IP),
        )


class CredentialTests(SynchronousTestCase):
    """
    L{IdentityResolver.isProxyCredential}: what the relay must not forward.
    """

    def test_credentials(self) -> None:
        """
        User keys and the admin key are proxy credentials, bare or as a C{Bearer} value;
        anything else is not.
        """
        r = resolver()
        for value in ["sk-alice", "Bearer sk-bob-1", " sk-bob-2 ", "admin-secret",
                      "bearer admin-secret"]:
            self.assertTrue(r.isProxyCredential(value), value)
        for value in ["", "Bearer ", "sk-openai", "Bearer sk-openai", "sk-alice2"]:
            self.assertFalse(r.isProxyCredential(value), value)

    def test_noAdminKey(self) -> None:
        """
        Without an admin key configured, nothing matches it (an empty value included).
        """
        r = IdentityResolver(Config())
        self.assertFalse(r.isProxyCredential(""))
        self.assertFalse(r.isProxyCredential("anything"))


class ReconfigureTests(SynchronousTestCase):
    """
    L{IdentityResolver.reconfigure}: a reloaded config's keys and trust settings.
    """

    def test_newKeys(self) -> None:
        """
        After a reload, new keys identify their users and removed keys no longer do.
        """
        resolver = IdentityResolver(Config(users={"alice": UserConfig(keys=("sk-old",))}))
        resolver.reconfigure(Config(users={"carol": UserConfig(keys=("sk-new",))}))
        self.assertEqual(
            resolver.identify(headers(authorization="Bearer sk-new"), "10.0.0.1"),
            Identity("carol", KEY),
        )
        self.assertNotEqual(
            resolver.identify(headers(authorization="Bearer sk-old"), "10.0.0.1").user,
            "alice",
        )
