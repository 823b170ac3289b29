# -*- test-case-name: tests.test_identity -*-
"""
Tests for L{ollamamq.identity}: bearer keys, C{X-User-ID}, client addresses and their
precedence.
"""

from __future__ import annotations

import hashlib
import ipaddress

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from ollamamq.config import Config, UserConfig
from ollamamq.errors import Unauthorized
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
            Identity("bob", KEY, True),
        )

    def test_bearerSchemeCaseAndSpaces(self) -> None:
        """
        The scheme is case-insensitive and surrounding whitespace is ignored.
        """
        self.assertEqual(
            resolver().identify(headers(authorization="  bearer   sk-alice "), "10.0.0.1"),
            Identity("alice", KEY, True),
        )

    def test_xApiKey(self) -> None:
        """
        C{x-api-key}, as Anthropic clients send it, works like a bearer key.
        """
        self.assertEqual(
            resolver().identify(headers(x_api_key="sk-alice"), "10.0.0.1"),
            Identity("alice", KEY, True),
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
            Identity("bob", KEY, True),
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
            Identity("alice", KEY, True),
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
            Identity("dave", HEADER, True),
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


def sha256(key: str) -> str:
    """
    The C{sha256:HEX} form of C{key}, as the config file takes it.
    """
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyFormTests(SynchronousTestCase):
    """
    Keys given as digests, bare C{Authorization} values, and keys added at runtime.
    """

    def test_digestKey(self) -> None:
        """
        A key configured as C{sha256:HEX} (any case) authenticates whoever presents the
        key itself; presenting the digest string does not.
        """
        users = {"erin": UserConfig(keys=(sha256("sk-erin").upper().replace("SHA256", "sha256"),))}
        r = IdentityResolver(Config(users=users))
        self.assertEqual(
            r.identify(headers(authorization="Bearer sk-erin"), "10.0.0.1"),
            Identity("erin", KEY, True),
        )
        self.assertEqual(
            r.identify(headers(authorization="Bearer " + sha256("sk-erin")), "10.0.0.1"),
            Identity("ip:10.0.0.1", IP),
        )
        self.assertTrue(r.isProxyCredential("sk-erin"))

    def test_bareAuthorization(self) -> None:
        """
        An C{Authorization} value that is a single token (no scheme) is taken as the key,
        as some Ollama-style clients send it.
        """
        self.assertEqual(
            resolver().identify(headers(authorization="sk-alice"), "10.0.0.1"),
            Identity("alice", KEY, True),
        )

    def test_addAndRemove(self) -> None:
        """
        A key added at runtime works at once, removed it stops at once; while a user has a
        key, C{X-User-ID} cannot name them.
        """
        r = resolver()
        digest = hashlib.sha256(b"sk-dave-new").digest()
        r.addKey("dave", digest)
        self.assertEqual(
            r.identify(headers(x_api_key="sk-dave-new"), "10.0.0.1"), Identity("dave", KEY, True)
        )
        self.assertEqual(r.identify(headers(x_user_id="dave"), "10.0.0.1"),
                         Identity("ip:10.0.0.1", IP))
        r.removeKey(digest)
        self.assertEqual(
            r.identify(headers(x_api_key="sk-dave-new"), "10.0.0.1"), Identity("ip:10.0.0.1", IP)
        )
        self.assertFalse(r.hasKeys("dave"))
        self.assertEqual(r.identify(headers(x_user_id="dave"), "10.0.0.1"),
                         Identity("dave", HEADER))
        # Removing an unknown digest is harmless; alice keeps her configured key.
        r.removeKey(digest)
        self.assertTrue(r.hasKeys("alice"))


class RequiredTests(SynchronousTestCase):
    """
    C{auth = "required"}: L{IdentityResolver.authenticate}.
    """

    def test_validKey(self) -> None:
        """
        A valid key passes.
        """
        r = resolver(auth="required")
        self.assertTrue(r.required)
        self.assertEqual(
            r.authenticate(headers(authorization="Bearer sk-alice"), "10.0.0.1"),
            Identity("alice", KEY, True),
        )

    def test_missingKey(self) -> None:
        """
        No key at all: 401 C{missing_api_key}, naming how to send one.
        """
        e = self.assertRaises(Unauthorized, resolver(auth="required").authenticate,
                              Headers(), "10.0.0.1")
        self.assertEqual((e.status, e.code), (401, "missing_api_key"))
        self.assertIn("Authorization: Bearer", e.message)

    def test_wrongKey(self) -> None:
        """
        An unknown key, the admin key, or a key under another scheme: 401
        C{invalid_api_key} (or C{missing_api_key} when nothing looks like a key).
        """
        r = resolver(auth="required")
        for h in [headers(authorization="Bearer sk-nope"), headers(x_api_key="sk-nope"),
                  headers(authorization="Bearer admin-secret")]:
            e = self.assertRaises(Unauthorized, r.authenticate, h, "10.0.0.1")
            self.assertEqual(e.code, "invalid_api_key")
        e = self.assertRaises(Unauthorized, r.authenticate,
                              headers(authorization="Basic c2stYWxpY2U="), "10.0.0.1")
        self.assertEqual(e.code, "missing_api_key")

    def test_headerNeedsTrustedProxy(self) -> None:
        """
        With auth required, C{X-User-ID} from an ordinary peer is no identity (401), while
        from a trusted proxy it names the authenticated end user behind it.
        """
        r = resolver(auth="required")
        self.assertRaises(Unauthorized, r.authenticate, headers(x_user_id="dave"), "10.0.0.1")
        self.assertEqual(
            r.authenticate(headers(x_user_id="dave"), "127.0.0.1"), Identity("dave", HEADER, True)
        )
        # Never for a user who has keys, even from the proxy.
        self.assertRaises(Unauthorized, r.authenticate, headers(x_user_id="alice"), "127.0.0.1")

    def test_optional(self) -> None:
        """
        With auth optional (the default) every request has an identity.
        """
        r = resolver()
        self.assertFalse(r.required)
        self.assertEqual(r.authenticate(Headers(), "10.0.0.1"), Identity("ip:10.0.0.1", IP))
        self.assertEqual(r.authenticate(headers(x_user_id="dave"), "10.0.0.1"),
                         Identity("dave", HEADER))


class AdminTests(SynchronousTestCase):
    """
    L{IdentityResolver.isAdmin}.
    """

    def test_admin(self) -> None:
        """
        The admin key as C{Authorization: Bearer} or C{X-Admin-Key}, in any of several
        values, is the admin; a user key, a wrong key, a bare C{Authorization} value or
        nothing is not.
        """
        r = resolver()
        for h in [headers(authorization="Bearer admin-secret"),
                  headers(x_admin_key=" admin-secret "),
                  headers(x_admin_key=["nope", "admin-secret"])]:
            self.assertTrue(r.isAdmin(h), h)
        for h in [Headers(), headers(authorization="Bearer sk-alice"),
                  headers(authorization="admin-secret"),
                  headers(x_admin_key="admin-secret2"), headers(authorization="Basic admin-secret")]:
            self.assertFalse(r.isAdmin(h), h)

    def test_noAdminKey(self) -> None:
        """
        Without an admin key configured nobody is the admin.
        """
        self.assertFalse(IdentityResolver(Config()).isAdmin(headers(x_admin_key="")))


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
            Identity("carol", KEY, True),
        )
        self.assertNotEqual(
            resolver.identify(headers(authorization="Bearer sk-old"), "10.0.0.1").user,
            "alice",
        )

    def test_runtimeKeysKept(self) -> None:
        """
        Keys minted at runtime survive a reload (they live in the state file, not the
        config); a config key dropped by the reload stops working.
        """
        resolver = IdentityResolver(Config(users={"alice": UserConfig(keys=("sk-old",))}))
        minted = hashlib.sha256(b"omq-minted").digest()
        resolver.addKey("dave", minted)
        resolver.reconfigure(Config(auth="required"))
        self.assertEqual(resolver.authenticate(headers(x_api_key="omq-minted"), "10.0.0.1"),
                         Identity("dave", KEY, True))
        self.assertRaises(Unauthorized, resolver.authenticate,
                          headers(x_api_key="sk-old"), "10.0.0.1")
