"""
Tests for L{ollamamq.config}.
"""

from __future__ import annotations

import ipaddress

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.config import (
    BackendConfig,
    ConfigError,
    buildConfig,
    loadConfigFile,
    parseTOML,
)

FULL = """
[server]
timeout = 120
health_interval = 5
max_queued_per_user = 20
max_queued_total = 500
max_body_bytes = 1000
trust_user_header = false
trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]
admin_key = "secret"
queue_timeout = 60

[[backends]]
url = "http://gpu1:11434/"
name = "gpu1"
slots = 2

[[backends]]
url = "http://gpu2:11434"

[users.alice]
priority = "vip"
keys = ["sk-alice"]
max_queued = 3

[users.bob]
priority = "boost"
weight = 2

[models."llama3:8b"]
aliases = ["gpt-4o-mini"]
keep_alive = "30m"
num_ctx = 8192
enforce = ["num_ctx"]
"""


class ParseTOMLTests(SynchronousTestCase):
    """
    L{parseTOML} turns every documented key into a L{Config} field.
    """

    def test_fullFile(self) -> None:
        """
        Every section of the documented example is read and converted.
        """
        config = buildConfig(parseTOML(FULL), {}, {})
        self.assertEqual(config.timeout, 120.0)
        self.assertEqual(config.healthInterval, 5.0)
        self.assertEqual(config.maxQueuedPerUser, 20)
        self.assertEqual(config.maxQueuedTotal, 500)
        self.assertEqual(config.maxBodyBytes, 1000)
        self.assertFalse(config.trustUserHeader)
        self.assertEqual(
            config.trustedProxies,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")),
        )
        self.assertEqual(config.adminKey, "secret")
        self.assertEqual(config.queueTimeout, 60.0)
        self.assertEqual(
            config.backends,
            (
                BackendConfig(url="http://gpu1:11434", name="gpu1", slots=2),
                # No slots set: what the backend reports (health.readFacts), else 1.
                BackendConfig(url="http://gpu2:11434", name="gpu2:11434", slots=None),
            ),
        )
        self.assertEqual(config.users["alice"].priority, "vip")
        self.assertEqual(config.users["alice"].keys, ("sk-alice",))
        self.assertEqual(config.users["alice"].maxQueued, 3)
        self.assertEqual(config.users["bob"].weight, 2.0)
        rule = config.models["llama3:8b"]
        self.assertEqual(rule.aliases, ("gpt-4o-mini",))
        self.assertEqual(rule.keepAlive, "30m")
        self.assertEqual(rule.numCtx, 8192)
        self.assertEqual(rule.enforce, frozenset({"num_ctx"}))

    def assertConfigError(self, text: str, *fragments: str) -> None:
        """
        Parsing C{text} fails with a L{ConfigError} whose message has every fragment.
        """
        with self.assertRaises(ConfigError) as caught:
            buildConfig(parseTOML(text), {}, {})
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_failureModelAndBounds(self) -> None:
        """
        The failure model, the two timeouts and the bounds a client cannot push are read
        from C{[server]}, with their documented defaults when absent.
        """
        defaults = buildConfig({}, {}, {})
        self.assertEqual(
            (defaults.timeout, defaults.firstByteTimeout, defaults.downAfter,
             defaults.downGrace, defaults.maxQueuedPerPeer, defaults.maxUsers),
            (300.0, 600.0, 3, None, 1000, 10000),
        )
        text = ("[server]\nfirst_byte_timeout = 900\ndown_after = 5\ndown_grace = 45\n"
                "max_queued_per_peer = 50\nmax_queued_bytes = 1000000\n"
                "max_blob_bytes = 5000000\nmax_users = 200\n")
        config = buildConfig(parseTOML(text), {}, {})
        self.assertEqual(
            (config.firstByteTimeout, config.downAfter, config.downGrace,
             config.maxQueuedPerPeer, config.maxQueuedBytes, config.maxBlobBytes,
             config.maxUsers),
            (900.0, 5, 45.0, 50, 1000000, 5000000, 200),
        )
        self.assertConfigError("[server]\ndown_after = 0\n", "server.down_after")
        self.assertConfigError("[server]\ndown_grace = -1\n", "server.down_grace")

    def test_unknownServerKey(self) -> None:
        """
        A misspelt key is named in the error, with the known keys.
        """
        self.assertConfigError("[server]\ntimout = 3\n", "server.timout", "unknown key", "timeout")

    def test_unknownSection(self) -> None:
        """
        An unknown top-level section is named.
        """
        self.assertConfigError("[servers]\n", "servers", "unknown section")

    def test_wrongTypes(self) -> None:
        """
        Wrong types are named with the key and the bad value.
        """
        self.assertConfigError('[server]\ntimeout = "fast"\n', "server.timeout", "positive number")
        self.assertConfigError("[server]\nmax_queued_total = 0\n", "server.max_queued_total")
        self.assertConfigError("[server]\ntrust_user_header = 1\n", "server.trust_user_header")
        self.assertConfigError('[server]\ntrusted_proxies = ["nope"]\n', "trusted_proxies[0]")
        self.assertConfigError('[users.a]\npriority = "gold"\n', "users.a.priority", "vip")
        self.assertConfigError('[users.a]\nweight = -1\n', "users.a.weight")
        self.assertConfigError('[[backends]]\nurl = "ftp://x"\n', "backends[0].url")
        self.assertConfigError('[[backends]]\nname = "x"\n', "backends[0].url", "missing")
        self.assertConfigError('[[backends]]\nurl = "http://x"\nslots = 0\n', "backends[0].slots")

    def test_badTOML(self) -> None:
        """
        A syntax error names the source and says it is not TOML.
        """
        with self.assertRaises(ConfigError) as caught:
            parseTOML("[server\n", "my.toml")
        self.assertIn("my.toml: not valid TOML", str(caught.exception))

    def test_duplicateKeysAndAliases(self) -> None:
        """
        One bearer key for two users, or one alias for two models, is refused.
        """
        self.assertConfigError(
            '[users.a]\nkeys = ["k"]\n[users.b]\nkeys = ["k"]\n', "users.b.keys", "'a'"
        )
        self.assertConfigError(
            '[models.a]\naliases = ["x"]\n[models.b]\naliases = ["X"]\n', "already an alias"
        )

    def test_securityKeys(self) -> None:
        """
        The authentication and abuse-limit keys are read: C{auth}, rate and running limits
        (server-wide and per user), C{client_timeout}, C{max_header_bytes}, a backend's own
        C{api_key}, and keys as C{sha256:} digests (normalised to lower case).
        """
        digest = "sha256:" + "AB" * 32
        config = buildConfig(parseTOML(f"""
[server]
auth = "required"
max_requests_per_minute = 60
max_running_per_user = 2
client_timeout = 5
max_header_bytes = 4096

[[backends]]
url = "http://gpu1:8080"
api_key = "llama-secret"

[users.alice]
keys = ["sk-alice", "{digest}"]
max_requests_per_minute = 10
max_running = 1
"""), {}, {})
        self.assertEqual(config.auth, "required")
        self.assertEqual(config.maxRequestsPerMinute, 60)
        self.assertEqual(config.maxRunningPerUser, 2)
        self.assertEqual(config.clientTimeout, 5.0)
        self.assertEqual(config.maxHeaderBytes, 4096)
        self.assertEqual(config.backends[0].apiKey, "llama-secret")
        self.assertNotIn("llama-secret", repr(config))
        alice = config.users["alice"]
        self.assertEqual(alice.keys, ("sk-alice", digest.lower()))
        self.assertEqual((alice.maxRequestsPerMinute, alice.maxRunning), (10, 1))
        self.assertNotIn("sk-alice", repr(config))
        # With auth required, X-User-ID is trusted only when asked for explicitly.
        self.assertFalse(config.trustUserHeader)
        trusting = buildConfig(parseTOML('[server]\nauth = "required"\ntrust_user_header = true\n'),
                               {}, {})
        self.assertTrue(trusting.trustUserHeader)
        defaults = buildConfig({}, {}, {})
        self.assertEqual((defaults.auth, defaults.maxRequestsPerMinute,
                          defaults.maxRunningPerUser), ("optional", None, None))

    def test_badSecurityKeys(self) -> None:
        """
        Bad values of the security keys are named; a key in the clear and its digest given
        to two users is a duplicate.
        """
        self.assertConfigError('[server]\nauth = "on"\n', "server.auth", "required")
        self.assertConfigError("[server]\nmax_requests_per_minute = 0\n",
                               "server.max_requests_per_minute")
        self.assertConfigError("[server]\nclient_timeout = -1\n", "server.client_timeout")
        self.assertConfigError("[server]\nmax_tokens_per_day = 0\n",
                               "server.max_tokens_per_day", "positive integer")
        config = buildConfig(parseTOML("[server]\nmax_tokens_per_day = 1000\n"
                                       "[users.a]\nmax_tokens_per_day = 50\n"), {}, {})
        self.assertEqual((config.maxTokensPerDay, config.users["a"].maxTokensPerDay),
                         (1000, 50))
        self.assertConfigError('[users.a]\nkeys = ["sha256:abc"]\n', "users.a.keys[0]", "64 hex")
        self.assertConfigError('[users.a]\nkeys = ["sk a"]\n', "users.a.keys[0]", "whitespace")
        self.assertConfigError('[users.a]\nmax_running = 0\n', "users.a.max_running")
        self.assertConfigError('[[backends]]\nurl = "http://x"\napi_key = ""\n',
                               "backends[0].api_key")
        import hashlib
        digest = "sha256:" + hashlib.sha256(b"k").hexdigest()
        self.assertConfigError(
            f'[users.a]\nkeys = ["k"]\n[users.b]\nkeys = ["{digest}"]\n', "users.b.keys", "'a'"
        )

    def test_enforceNeedsValue(self) -> None:
        """
        Enforcing an option that has no configured value is an error.
        """
        self.assertConfigError('[models.a]\nenforce = ["num_ctx"]\n', "num_ctx is enforced")
        self.assertConfigError('[models.a]\nenforce = ["temperature"]\n', "can enforce only")

    def test_duplicateBackendNames(self) -> None:
        """
        Two backends with one name would be indistinguishable in status and metrics.
        """
        self.assertConfigError(
            '[[backends]]\nurl = "http://a:1"\nname = "x"\n[[backends]]\nurl = "http://b:1"\nname = "x"\n',
            "duplicate name",
        )


class FairShareTests(SynchronousTestCase):
    """
    C{[server] fair_share} picks the scheduler's unit of service.
    """

    def test_default(self) -> None:
        """
        Without the key, service is counted in requests.
        """
        self.assertEqual(buildConfig({}, {}, {}).fairShare, "requests")

    def test_values(self) -> None:
        """
        Both documented values are accepted as they are.
        """
        for value in ("requests", "time"):
            config = buildConfig(parseTOML(f'[server]\nfair_share = "{value}"\n'), {}, {})
            self.assertEqual(config.fairShare, value)

    def test_badValues(self) -> None:
        """
        Anything else (another word, another case, another type) is a L{ConfigError} naming
        the key, the allowed values and the bad value.
        """
        cases = (('"gpu"', "'gpu'"), ('"Time"', "'Time'"), ("1", "1"), ('["time"]', "['time']"))
        for raw, shown in cases:
            with self.assertRaises(ConfigError) as caught:
                parseTOML(f"[server]\nfair_share = {raw}\n")
            message = str(caught.exception)
            for fragment in ("server.fair_share", '"requests"', '"time"', f"got {shown}"):
                self.assertIn(fragment, message)


class PrecedenceTests(SynchronousTestCase):
    """
    Command line over environment over file over defaults.
    """

    def test_defaults(self) -> None:
        """
        With nothing given, the proxy listens on 127.0.0.1:11435 and uses a local Ollama.
        """
        config = buildConfig({}, {}, {})
        self.assertEqual(config.listen, ("tcp:11435:interface=127.0.0.1",))
        self.assertEqual([b.url for b in config.backends], ["http://localhost:11434"])
        self.assertEqual(config.timeout, 300.0)

    def test_environmentOverFile(self) -> None:
        """
        C{OLLAMA_URLS} replaces the file's backends.
        """
        config = buildConfig(
            parseTOML('[[backends]]\nurl = "http://file:1"\n'),
            {},
            {"OLLAMA_URLS": "http://a:1, http://b:2"},
        )
        self.assertEqual([b.url for b in config.backends], ["http://a:1", "http://b:2"])

    def test_commandLineOverAll(self) -> None:
        """
        Fields given on the command line win.
        """
        config = buildConfig(
            parseTOML("[server]\ntimeout = 5\n"),
            {"timeout": 7.0},
            {},
        )
        self.assertEqual(config.timeout, 7.0)

    def test_badEnvironmentURL(self) -> None:
        """
        A bad URL in C{OLLAMA_URLS} is named as coming from there.
        """
        with self.assertRaises(ConfigError) as caught:
            buildConfig({}, {}, {"OLLAMA_URLS": "gpu1:11434"})
        self.assertIn("OLLAMA_URLS", str(caught.exception))

    def test_demoNeedsNoBackend(self) -> None:
        """
        With C{--demo} and no backend given, no default backend is added.
        """
        self.assertEqual(buildConfig({}, {"demo": True}, {}).backends, ())


class LoadConfigFileTests(SynchronousTestCase):
    """
    L{loadConfigFile} reads files and reports unreadable ones.
    """

    def test_missingFile(self) -> None:
        """
        A missing file is a L{ConfigError} naming the path.
        """
        path = self.mktemp()
        with self.assertRaises(ConfigError) as caught:
            loadConfigFile(path)
        self.assertIn(path, str(caught.exception))

    def test_readsFile(self) -> None:
        """
        An existing file is parsed.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"[server]\ntimeout = 9\n")
        self.assertEqual(loadConfigFile(path.path), {"timeout": 9.0})
