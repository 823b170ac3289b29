"""
Real processes for integration tests: simulators (C{ollamamq-sim}) and the proxy
(C{twistd -n ollamamq}) on 127.0.0.1 with system-chosen ports.

Readiness is taken from the processes' own output (the line announcing the port, the
health checker's "online" line), never from sleeping. Every process is stopped and
reaped in the test's cleanup.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

import ollamamq

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ollamamq.__file__)))

# A whole integration test may take this long before trial calls it hung.
TIMEOUT = 60

# What the proxy logs when a backend comes online (ollamamq.health).
ONLINE_LINE = r"Backend (\S+) \(\S+\) is online"


def _script(name: str) -> list[str]:
    """
    The command for a console script of this environment (next to the interpreter).
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return [path]
    if name == "twistd":
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    return [sys.executable, "-m", "ollamamq.sim"]


class WatchedProcess(ProcessProtocol):
    """
    A child process whose output lines can be waited for.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.output: list[str] = []
        self._buffer = b""
        # (predicate over all lines so far, Deferred fired with its truthy result)
        self._waiters: list[tuple[Any, Deferred[Any]]] = []
        self.ended: Deferred[None] = Deferred()
        self.exited = False

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if not lines:
            return
        self.output.extend(raw.decode("utf-8", "replace") for raw in lines)
        for waiter in list(self._waiters):
            result = waiter[0](self.output)
            if result:
                self._waiters.remove(waiter)
                waiter[1].callback(result)

    errReceived = outReceived

    def waitUntil(self, predicate: Any) -> Deferred[Any]:
        """
        Fire with C{predicate(lines)} once it is truthy for the output lines so far.
        """
        d: Deferred[Any] = Deferred()
        result = predicate(self.output)
        if result:
            d.callback(result)
        else:
            self._waiters.append((predicate, d))
        return d

    def waitFor(self, pattern: str) -> Deferred[re.Match[str]]:
        """
        Fire with the match of the first output line matching C{pattern}.
        """
        compiled = re.compile(pattern)

        def first(lines: list[str]) -> re.Match[str] | None:
            for line in lines:
                match = compiled.search(line)
                if match:
                    return match
            return None

        return self.waitUntil(first)

    def waitForDistinct(self, pattern: str, count: int) -> Deferred[set[str]]:
        """
        Fire once lines matching C{pattern} have given C{count} distinct first groups.
        """
        compiled = re.compile(pattern)

        def distinct(lines: list[str]) -> set[str] | None:
            found = {m.group(1) for m in map(compiled.search, lines) if m}
            return found if len(found) >= count else None

        return self.waitUntil(distinct)

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        for _, waiter in self._waiters:
            waiter.errback(
                RuntimeError(f"{self.name} exited: {reason.value}\n" + "\n".join(self.output[-30:]))
            )
        self._waiters = []
        self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        """
        Terminate the process and wait until it is reaped; its output goes to the test
        log (_trial_temp/test.log) for diagnosis.
        """
        from twisted.python import log

        log.msg(f"--- output of {self.name} ---\n" + "\n".join(self.output))
        if not self.exited:
            try:
                self.transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
        return self.ended


class ProcessTestCase(TestCase):
    """
    A trial test case that starts real simulators and proxies.
    """

    timeout = TIMEOUT

    def setUp(self) -> None:
        """
        An HTTP client whose persistent connections are closed when the test ends.
        """
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def spawn(self, name: str, argv: list[str]) -> WatchedProcess:
        """
        Start a process, stopped again at cleanup.
        """
        process = WatchedProcess(name)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # The children import the same ollamamq as this test run, wherever their cwd is.
        env["PYTHONPATH"] = os.pathsep.join(
            [PROJECT_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        reactor.spawnProcess(process, argv[0], argv, env=env)
        self.addCleanup(process.stop)
        return process

    async def startSimulator(self, *args: str, port: int = 0) -> tuple[str, WatchedProcess]:
        """
        Start C{ollamamq-sim} (on a free port unless C{port} is given); return its URL and
        process. It runs with C{-v}, so it logs each request's start and end.
        """
        argv = _script("ollamamq-sim") + ["--port", str(port), "-v", *args]
        process = self.spawn("sim", argv)
        match = await process.waitFor(r"ollamamq-sim listening on (http://\S+)")
        return match.group(1), process

    async def startProxy(self, *args: str, backends: int = 0) -> tuple[str, WatchedProcess]:
        """
        Start C{twistd -n ollamamq} on a free port; return its URL once it listens and
        C{backends} backends were found online.
        """
        workdir = self.mktemp()
        os.makedirs(workdir)
        argv = _script("twistd") + [
            "-n",
            "--pidfile=",
            "ollamamq",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--control",
            os.path.join(workdir, "control.sock"),
            "--state",
            os.path.join(workdir, "state.db"),
            *args,
        ]
        process = self.spawn("proxy", argv)
        match = await process.waitFor(r"ollamamq listening on (http://[\d.]+:\d+)/")
        if backends:
            await process.waitForDistinct(ONLINE_LINE, backends)
        return match.group(1), process


def threaded(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """
    Run a blocking client call in a thread, so the reactor keeps reading the children's
    output (a full pipe would stall them).
    """
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args, **kwargs)
