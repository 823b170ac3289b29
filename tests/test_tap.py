"""
Tests for L{ollamamq.tap}: command-line options and the service tree.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.config import ConfigError
from ollamamq.tap import Options, makeService


def parse(*argv: str, environ: dict[str, str] | None = None) -> Options:
    """
    Parse C{argv} as C{twistd ollamamq} would, with a controlled environment.
    """
    options = Options()
    options.environ = environ or {}
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    """
    Every documented option, and clear errors for bad values.
    """

    def test_defaults(self) -> None:
        """
        With no options: 127.0.0.1:11435, a local Ollama, 300 s idle timeout.
        """
        config = parse().config
        self.assertEqual(config.listen, ("tcp:11435:interface=127.0.0.1",))
        self.assertEqual([b.url for b in config.backends], ["http://localhost:11434"])
        self.assertEqual((config.timeout, config.healthInterval), (300.0, 10.0))
        self.assertFalse(config.allowAllRoutes or config.demo)

    def test_everyOption(self) -> None:
        """
        Each option lands in its config field.
        """
        config = parse(
            "-p", "9000", "--listen", "tcp:9001", "-b", "http://a:1", "--backend", "http://b:2",
            "--backends", "http://c:3,http://d:4", "-t", "12", "--health-interval", "3",
            "--control", "/run/c.sock", "--state", "/var/s.db", "--allow-all-routes", "--demo",
        ).config
        self.assertEqual(config.listen, ("tcp:9000:interface=127.0.0.1", "tcp:9001"))
        self.assertEqual([b.url for b in config.backends],
                         ["http://a:1", "http://b:2", "http://c:3", "http://d:4"])
        self.assertEqual((config.timeout, config.healthInterval), (12.0, 3.0))
        self.assertEqual((config.control, config.state), ("/run/c.sock", "/var/s.db"))
        self.assertTrue(config.allowAllRoutes and config.demo)

    def test_environmentBackends(self) -> None:
        """
        C{OLLAMA_URLS} gives the backends when the command line does not.
        """
        config = parse(environ={"OLLAMA_URLS": "http://x:1,http://y:2"}).config
        self.assertEqual([b.name for b in config.backends], ["x:1", "y:2"])
        config = parse("-b", "http://z:3", environ={"OLLAMA_URLS": "http://x:1"}).config
        self.assertEqual([b.name for b in config.backends], ["z:3"])

    def test_configFileUnderCommandLine(self) -> None:
        """
        The config file is read; the command line overrides it.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"[server]\ntimeout = 50\nhealth_interval = 2\n")
        config = parse("-c", path.path, "-t", "60").config
        self.assertEqual((config.timeout, config.healthInterval), (60.0, 2.0))

    def assertUsageError(self, *argv: str, fragment: str) -> None:
        """
        Parsing fails with a L{usage.UsageError} mentioning C{fragment}.
        """
        with self.assertRaises(usage.UsageError) as caught:
            parse(*argv)
        self.assertIn(fragment, str(caught.exception))

    def test_badValues(self) -> None:
        """
        Bad values are usage errors that say what is wrong.
        """
        self.assertUsageError("-p", "99999", fragment="port must be 0-65535")
        self.assertUsageError("-p", "http", fragment="invalid literal")
        self.assertUsageError("-t", "0", fragment="positive number of seconds")
        self.assertUsageError("--health-interval", "-1", fragment="positive")
        self.assertUsageError("-b", "localhost:11434", fragment="http:// or https://")
        self.assertUsageError("-c", "/nonexistent/x.toml", fragment="cannot read config file")
        self.assertUsageError("--listen", "tcp:1:interface=::1", fragment="bad --listen endpoint")
        self.assertUsageError("--listen", "bogus:1", fragment="bad --listen endpoint")

    def test_badConfigKey(self) -> None:
        """
        An unknown key in the config file stops startup, naming the key.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"[server]\nmax_queue = 3\n")
        self.assertUsageError("-c", path.path, fragment="server.max_queue")

    def test_modelRuleClash(self) -> None:
        """
        Model rules that clash once names are canonicalised are a usage error, not a
        traceback at startup.
        """
        path = FilePath(self.mktemp())
        path.setContent(b'[models.llama3]\n[models."LLAMA3:latest"]\n')
        with self.assertRaises(usage.UsageError):
            parse("-c", path.path)


class ServiceTests(SynchronousTestCase):
    """
    L{makeService} on a memory reactor.
    """

    def test_listensAndStops(self) -> None:
        """
        Starting listens on every endpoint; stopping completes.
        """
        reactor = MemoryReactorClock()
        service = makeService(parse("-p", "12345", "--listen", r"tcp:12346:interface=\:\:1"),
                              reactor=reactor)
        service.startService()
        ports = sorted((port, interface) for port, _, _, interface in reactor.tcpServers)
        self.assertEqual(ports, [(12345, "127.0.0.1"), (12346, "::1")])
        d = service.stopService()
        reactor.advance(0.1)
        self.successResultOf(d)

    def test_demoStartsSimulators(self) -> None:
        """
        With C{--demo}, two simulators listen on free loopback ports.
        """
        reactor = MemoryReactorClock()
        service = makeService(parse("--demo", "-p", "12345"), reactor=reactor)
        service.startService()
        self.assertEqual(
            sorted((port, interface) for port, _, _, interface in reactor.tcpServers),
            [(0, "127.0.0.1"), (0, "127.0.0.1"), (12345, "127.0.0.1")],
        )
        d = service.stopService()
        reactor.advance(0.1)
        self.successResultOf(d)


class DrainTests(SynchronousTestCase):
    """
    Stopping lets running requests finish, within a grace period.
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock
        from twisted.web.client import HTTPConnectionPool

        from ollamamq.backends import OLLAMA, Backend, BackendPool
        from ollamamq.config import Config
        from ollamamq.scheduler import Job, Scheduler
        from ollamamq.tap import _DrainService

        self.clock = Clock()
        pool = BackendPool([Backend(name="a", url="http://a", slots=2)])
        pool.markOnline(pool.get("a"), OLLAMA, ["m"])
        self.scheduler = Scheduler(pool, self.clock, Config())
        job = Job(user="u", kinds=frozenset({OLLAMA}), model="m:latest")
        self.lease = self.successResultOf(self.scheduler.enqueue(job))
        self.queued = self.scheduler.enqueue(job)
        self.queued2 = self.scheduler.enqueue(job)
        self.drain = _DrainService(self.scheduler, HTTPConnectionPool(self.clock), self.clock, 5)
        self.drain.startService()

    def test_waitsForRunning(self) -> None:
        """
        Stopping refuses new work and fires once the running requests are released.
        """
        d = self.drain.stopService()
        self.clock.advance(1)
        self.assertNoResult(d)
        self.assertEqual(self.scheduler.active, 2)
        self.lease.release()
        self.successResultOf(self.queued).release()
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.failureResultOf(self.queued2)

    def test_graceEnds(self) -> None:
        """
        After the grace period stopping completes even with requests still running.
        """
        d = self.drain.stopService()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.successResultOf(d)
        self.failureResultOf(self.queued2)



class SystemdListenTests(SynchronousTestCase):
    """
    C{--listen systemd:...} takes sockets passed by systemd (socket activation).
    """

    def test_missingSocket(self) -> None:
        """
        Naming a socket systemd did not pass is a usage error that says so (rather than a
        daemon that starts and serves nothing).
        """
        with self.assertRaises(usage.UsageError) as caught:
            parse("--listen", "systemd:domain=INET:name=http")
        self.assertIn("systemd passed no socket named 'http'", str(caught.exception))


class InjectedReactorTests(SynchronousTestCase):
    """
    The daemon's timers run on the reactor it is given, and production code never
    imports test helpers.
    """

    def test_siteOnInjectedReactor(self) -> None:
        """
        The HTTP site (whose idle-connection timers twisted.web keeps) and the front's
        request class are the ones L{makeService} was given.
        """
        reactor = MemoryReactorClock()
        service = makeService(parse("-p", "12345"), reactor=reactor)
        service.startService()
        factory = reactor.tcpServers[0][1]
        site = getattr(factory, "wrappedFactory", factory)
        self.assertIs(site.reactor, reactor)
        self.assertEqual(site.requestFactory.__name__, "FrontRequest")
        d = service.stopService()
        reactor.advance(0.1)
        self.successResultOf(d)

    def test_noTestHelpersImported(self) -> None:
        """
        Importing every module of the package loads neither twisted.internet.testing nor
        the deprecated proto_helpers.
        """
        import subprocess
        import sys

        code = (
            "import pkgutil, sys, ollamamq\n"
            "for m in pkgutil.walk_packages(ollamamq.__path__, 'ollamamq.'):\n"
            "    __import__(m.name)\n"
            "print(sorted(n for n in sys.modules if n in ('twisted.internet.testing', "
            "'twisted.test.proto_helpers')))\n"
        )
        import os

        import ollamamq

        root = os.path.dirname(os.path.dirname(os.path.abspath(ollamamq.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=env)
        self.assertEqual(out.stdout.strip(), "[]", out.stderr)


class FileLimitTests(SynchronousTestCase):
    """
    The open-file limit is raised at start, with a warning when it cannot hold the
    queue's connections.
    """

    def start(self, soft: int, hard: int, needed: int) -> tuple[list, list]:
        import resource

        from twisted.logger import globalLogPublisher

        from ollamamq import tap

        calls: list = []
        events: list = []
        self.patch(resource, "getrlimit", lambda which: (soft, hard))
        self.patch(resource, "setrlimit", lambda which, limits: calls.append(limits))
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tap._FileLimitService(needed).startService()
        return calls, [e for e in events if e.get("log_level") is not None
                       and e["log_level"].name == "warn"]

    def test_raisedToHard(self) -> None:
        """
        The soft limit goes up to the hard one; no warning when that is enough.
        """
        calls, warnings = self.start(1024, 65536, 10256)
        self.assertEqual((calls, warnings), ([(65536, 65536)], []))

    def test_warnsWhenTooLow(self) -> None:
        """
        A hard limit below what C{max_queued_total} connections need is warned about.
        """
        calls, warnings = self.start(1024, 4096, 10256)
        self.assertEqual(calls, [(4096, 4096)])
        self.assertEqual(len(warnings), 1)
        self.assertIn("max_queued_total", warnings[0]["log_format"])


class ControlWiringTests(SynchronousTestCase):
    """
    The control plane in L{makeService}: the state file, the control socket, reloading.
    """

    def test_controlSocket(self) -> None:
        """
        The control socket listens at C{--control}, mode 0600, with a lockfile.
        """
        reactor = MemoryReactorClock()
        path = self.mktemp()
        service = makeService(parse("-p", "0", "--control", path, "--state", self.mktemp()),
                              reactor=reactor)
        service.privilegedStartService()
        [(address, _, _, mode, wantPID)] = reactor.unixServers
        self.assertEqual((address, mode, wantPID), (path, 0o600, True))

    def test_unusableState(self) -> None:
        """
        A state file that is not a database stops startup with one clear message.
        """
        state = FilePath(self.mktemp())
        state.setContent(b"not a database at all\n" * 100)
        error = self.assertRaises(SystemExit, makeService,
                                  parse("-p", "0", "--state", state.path),
                                  reactor=MemoryReactorClock())
        self.assertIn(f"state file {state.path} is not a usable SQLite database", str(error))

    def test_reloadConfig(self) -> None:
        """
        L{Options.reloadConfig} reads the file again under the same command line, and
        refuses a broken file with a L{ConfigError}.
        """
        config = FilePath(self.mktemp())
        config.setContent(b"[server]\ntimeout = 5\n")
        options = parse("-c", config.path, "--health-interval", "3")
        config.setContent(b"[server]\ntimeout = 7\nhealth_interval = 9\n")
        reloaded = options.reloadConfig()
        self.assertEqual((reloaded.timeout, reloaded.healthInterval), (7.0, 3.0))
        config.setContent(b"[server]\ntimeout = -1\n")
        self.assertRaises(ConfigError, options.reloadConfig)
        self.assertRaises(ConfigError, parse().reloadConfig)


class ReloadSignalTests(SynchronousTestCase):
    """
    L{_ReloadOnSignal}: the signal schedules a reload on the reactor.
    """

    def test_signalReloads(self) -> None:
        """
        The signal makes the reactor run the reload; a refused reload is not raised; on
        stop the previous handler is back.
        """
        import os
        import signal

        from ollamamq.control.amp import ReloadFailed
        from ollamamq.tap import _ReloadOnSignal

        scheduled: list = []

        class Reactor:
            def callFromThread(self, f, *args):
                scheduled.append((f, args))

        calls: list[str] = []

        def reload() -> None:
            calls.append("reload")
            if len(calls) == 2:
                raise ReloadFailed("broken")

        previous = signal.getsignal(signal.SIGUSR2)
        service = _ReloadOnSignal(Reactor(), reload, signal.SIGUSR2)
        service.startService()
        try:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGUSR2)
                [(f, args)] = scheduled
                scheduled.clear()
                f(*args)
        finally:
            service.stopService()
        self.assertEqual(calls, ["reload", "reload"])
        self.assertEqual(signal.getsignal(signal.SIGUSR2), previous)
