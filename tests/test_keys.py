# -*- test-case-name: tests.test_keys -*-
"""
Tests for L{ollamamq.keys}: the key format, C{ollamamq-keys}, minted keys in the state
file (stored hashed only), and the admin routes that mint and revoke them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from ollamamq.config import Config, UserConfig
from ollamamq.identity import KEY, IdentityResolver
from ollamamq.keys import MintedKeys, UnknownKey, loadKeys, main, mintKey
from ollamamq.store import SCHEMA_VERSION, Store, migrate
from tests.test_access import GatedProxy
from tests.test_api import CHAT

KEY_FORM = re.compile(r"omq-[0-9a-f]{8}-[A-Za-z0-9_-]{43}\Z")


def bearer(key: str) -> Headers:
    """
    Headers presenting C{key} as a bearer token.
    """
    return Headers({b"authorization": [b"Bearer " + key.encode()]})


class FormatTests(SynchronousTestCase):
    """
    L{mintKey} and the C{ollamamq-keys} command.
    """

    def test_mintKey(self) -> None:
        """
        A key is C{omq-<8 hex>-<43 url-safe>}, named by its prefix; the digest is the
        C{sha256:} of the whole key; the repr does not show the key.
        """
        minted = mintKey()
        self.assertRegex(minted.key, KEY_FORM)
        self.assertEqual(minted.key[4:12], minted.prefix)
        self.assertEqual(minted.digest,
                         "sha256:" + hashlib.sha256(minted.key.encode()).hexdigest())
        self.assertNotIn(minted.key, repr(minted))
        self.assertNotEqual(mintKey().key, minted.key)

    def test_cliNew(self) -> None:
        """
        C{ollamamq-keys new --user alice} prints a key, its digest and a config snippet
        whose digest the config file accepts for that key.
        """
        out = io.StringIO()
        self.assertEqual(main(["new", "--user", "alice"], stdout=out), 0)
        text = out.getvalue()
        key = re.search(r"^key:\s+(\S+)$", text, re.M).group(1)
        digest = re.search(r"^digest:\s+(sha256:\S+)$", text, re.M).group(1)
        self.assertRegex(key, KEY_FORM)
        self.assertIn(f'[users.alice]\nkeys = ["{digest}"]', text)
        identity = IdentityResolver(Config(users={"alice": UserConfig(keys=(digest,))}))
        self.assertEqual(identity.identify(bearer(key), "10.0.0.1").user, "alice")

    def test_cliHash(self) -> None:
        """
        C{ollamamq-keys hash} prints the C{sha256:} form of the key on standard input, and
        refuses an empty one.
        """
        out = io.StringIO()
        self.assertEqual(main(["hash"], stdin=io.StringIO("sk-alice\n"), stdout=out), 0)
        self.assertEqual(out.getvalue(),
                         "sha256:" + hashlib.sha256(b"sk-alice").hexdigest() + "\n")
        self.patch(__import__("sys"), "stderr", io.StringIO())
        self.assertEqual(main(["hash"], stdin=io.StringIO("\n"), stdout=io.StringIO()), 2)


def _digests(path: str) -> list[tuple]:
    """
    Every row of the C{api_keys} table of the file at C{path}.
    """
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT * FROM api_keys").fetchall()
    finally:
        connection.close()


class StoredKeysTests(TestCase):
    """
    L{MintedKeys} on a real L{Store} (its own thread), and L{loadKeys} at startup.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.identity = IdentityResolver(Config(auth="required"))
        self.store = Store(self.path, Clock(), reactor)
        self.store.start()
        self.addCleanup(self.store.close)
        self.keys = MintedKeys(self.store, self.identity, Clock())

    async def test_mintStoredHashed(self) -> None:
        """
        A minted key works at once; the state file holds its digest, never the key.
        """
        minted = await self.keys.mint("alice")
        self.assertEqual(self.identity.authenticate(bearer(minted.key), "10.0.0.1").source, KEY)
        rows = _digests(self.path)
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0][:3], (minted.prefix, "alice",
                                       hashlib.sha256(minted.key.encode()).hexdigest()))
        with open(self.path, "rb") as f:
            raw = f.read()
        secret = minted.key.encode()
        self.assertNotIn(secret, raw)
        for name in (self.path + "-wal",):
            try:
                with open(name, "rb") as f:
                    self.assertNotIn(secret, f.read())
            except FileNotFoundError:
                pass

    async def test_revoke(self) -> None:
        """
        A revoked key stops at once and its row is gone; the user's other key still
        works; an unknown prefix (or another user's) is L{UnknownKey}.
        """
        first = await self.keys.mint("alice")
        second = await self.keys.mint("alice")
        bobs = await self.keys.mint("bob")
        with self.assertRaises(UnknownKey):
            await self.keys.revoke("alice", bobs.prefix)
        await self.keys.revoke("alice", first.prefix)
        from ollamamq.errors import Unauthorized

        self.assertRaises(Unauthorized, self.identity.authenticate, bearer(first.key), "h")
        self.assertEqual(self.identity.authenticate(bearer(second.key), "h").user, "alice")
        self.assertEqual(sorted(r[0] for r in _digests(self.path)),
                         sorted([second.prefix, bobs.prefix]))
        listed = await self.keys.list("alice")
        self.assertEqual([k.prefix for k in listed], [second.prefix])
        with self.assertRaises(UnknownKey):
            await self.keys.revoke("alice", first.prefix)

    async def test_loadAtStartup(self) -> None:
        """
        L{loadKeys} (the startup read) gives a new resolver every stored key.
        """
        minted = await self.keys.mint("carol")
        fresh = IdentityResolver(Config(auth="required"))
        self.assertEqual(loadKeys(self.path, fresh), 1)
        self.assertEqual(fresh.authenticate(bearer(minted.key), "h").user, "carol")


class LoadTests(SynchronousTestCase):
    """
    L{loadKeys} on files without the table.
    """

    def test_createsAndMigrates(self) -> None:
        """
        A missing file is created at the current schema version with no keys.
        """
        path = self.mktemp()
        self.assertEqual(loadKeys(path, IdentityResolver(Config())), 0)
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)

    def test_unusableFile(self) -> None:
        """
        A file that is no database is refused with a L{StoreError} naming it.
        """
        from ollamamq.store import StoreError

        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not a database at all" * 100)
        error = self.assertRaises(StoreError, loadKeys, path, IdentityResolver(Config()))
        self.assertIn(path, str(error))


class _ImmediateStore:
    """
    A store that runs each interaction at once on an in-memory SQLite database with the
    real schema: the real queries, without a thread, for tests on a L{Clock}.
    """

    def __init__(self) -> None:
        self.connection = sqlite3.connect(":memory:", isolation_level=None)
        migrate(self.connection, ":memory:")

    def runInteraction(self, fn: Any, *args: Any) -> Deferred:
        try:
            return succeed(fn(self.connection.cursor(), *args))
        except Exception:
            return fail()


class RouteTests(SynchronousTestCase):
    """
    C{POST /proxy/users/{id}/keys}, C{GET} it, C{DELETE .../keys/{prefix}}.
    """

    def setUp(self) -> None:
        self.proxy = GatedProxy(self, auth="required")
        self.store = _ImmediateStore()
        self.proxy.api.keys = MintedKeys(self.store, self.proxy.api.identity, self.proxy.clock)
        self.admin = {"Authorization": "Bearer admin-secret"}

    def test_mintUseRevoke(self) -> None:
        """
        The admin mints a key (201, shown once, not cacheable); it works at once as that
        user; the listing shows its prefix only; revoked, it is refused at once.
        """
        response, body = self.proxy.complete("POST", "/proxy/users/dave/keys",
                                             headers=self.admin)
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        minted = json.loads(body)
        self.assertRegex(minted["key"], KEY_FORM)
        key = {"Authorization": "Bearer " + minted["key"]}
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT, key)
        self.assertEqual(response.code, 200)
        self.assertIn("dave", [u["id"] for u in self.proxy.scheduler.snapshot()])
        stored = self.store.connection.execute("SELECT prefix, user, digest FROM api_keys").fetchall()
        self.assertEqual(stored, [(minted["prefix"], "dave",
                                   hashlib.sha256(minted["key"].encode()).hexdigest())])

        response, body = self.proxy.complete("GET", "/proxy/users/dave/keys", headers=self.admin)
        listing = json.loads(body)
        self.assertEqual([k["prefix"] for k in listing["keys"]], [minted["prefix"]])
        self.assertNotIn(minted["key"], body.decode())

        response, _ = self.proxy.complete(
            "DELETE", f"/proxy/users/dave/keys/{minted['prefix']}", headers=self.admin)
        self.assertEqual(response.code, 200)
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT, key)
        self.assertEqual(response.code, 401)
        response, _ = self.proxy.complete(
            "DELETE", f"/proxy/users/dave/keys/{minted['prefix']}", headers=self.admin)
        self.assertEqual(response.code, 404)

    def test_adminOnly(self) -> None:
        """
        Without the admin key the key routes are 401, even with a user's key; nothing is
        minted.
        """
        for headers in [{}, {"Authorization": "Bearer sk-alice"}]:
            for method, path in [("POST", "/proxy/users/alice/keys"),
                                 ("GET", "/proxy/users/alice/keys"),
                                 ("DELETE", "/proxy/users/alice/keys/abcd1234")]:
                response, _ = self.proxy.complete(method, path, headers=headers)
                self.assertEqual(response.code, 401, (method, path, headers))
        self.assertEqual(self.store.connection.execute("SELECT * FROM api_keys").fetchall(), [])

    def test_badUser(self) -> None:
        """
        An address-style user id is refused (400): keys name users, not hosts.
        """
        response, body = self.proxy.complete("POST", "/proxy/users/ip:10.0.0.1/keys",
                                             headers=self.admin)
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["error"], "not a user id a key can name: 'ip:10.0.0.1'")

    def test_noStore(self) -> None:
        """
        Without a state store the routes answer 503.
        """
        self.proxy.api.keys = None
        response, _ = self.proxy.complete("POST", "/proxy/users/dave/keys", headers=self.admin)
        self.assertEqual(response.code, 503)



class AMPTests(SynchronousTestCase):
    """
    L{commands.MintKey}, L{commands.ListKeys} and L{commands.RevokeKey} over the control
    socket: the same as the HTTP routes.
    """

    def setUp(self) -> None:
        from twisted.test.iosim import connectedServerAndClient

        from ollamamq.control.server import ControlFactory
        from tests.controlfixture import ControlFixture
        from tests.test_control_server import Client

        fixture = ControlFixture()
        self.identity = IdentityResolver(Config(auth="required"))
        self.store = _ImmediateStore()
        factory = ControlFactory(fixture.actions, fixture.hub,
                                 MintedKeys(self.store, self.identity, Clock()))
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), Client)

    def call(self, command: Any, **kw: Any) -> Any:
        """
        Call C{command}; its answer, or the Failure it ended with.
        """
        results: list = []
        self.client.callRemote(command, **kw).addBoth(results.append)
        self.pump.flush()
        return results[0]

    def test_mintListRevoke(self) -> None:
        """
        A key minted over AMP works at once and is stored hashed; the listing shows its
        prefix; revoked, it is refused at once; revoking again is C{UNKNOWN_KEY}.
        """
        from ollamamq.control import amp as commands
        from ollamamq.errors import Unauthorized

        minted = self.call(commands.MintKey, user="erin")
        self.assertRegex(minted["key"], KEY_FORM)
        self.assertEqual(self.identity.authenticate(bearer(minted["key"]), "h").user, "erin")
        self.assertEqual(
            self.store.connection.execute("SELECT digest FROM api_keys").fetchall(),
            [(hashlib.sha256(minted["key"].encode()).hexdigest(),)])
        listed = self.call(commands.ListKeys, user="erin")
        self.assertEqual([k["prefix"] for k in listed["keys"]], [minted["prefix"]])
        self.assertEqual(self.call(commands.RevokeKey, user="erin", prefix=minted["prefix"]),
                         {"user": "erin", "prefix": minted["prefix"]})
        self.assertRaises(Unauthorized, self.identity.authenticate, bearer(minted["key"]), "h")
        again = self.call(commands.RevokeKey, user="erin", prefix=minted["prefix"])
        again.trap(commands.UnknownKey)

    def test_badUser(self) -> None:
        """
        An address-style user id is C{INVALID_VALUE}; nothing is minted.
        """
        from ollamamq.control import amp as commands

        self.call(commands.MintKey, user="ip:10.0.0.1").trap(commands.InvalidValue)
        self.assertEqual(self.store.connection.execute("SELECT * FROM api_keys").fetchall(), [])
