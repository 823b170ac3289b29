# -*- test-case-name: tests.test_sim -*-
"""
A simulated Ollama / OpenAI / Anthropic / llama-server backend, served on a stream server
endpoint: L{SimulatorService} and L{simulatorService}.

The simulator is split by concern:

  - L{ollamamq.sim.options}: L{SimulatorOptions}, how it behaves;
  - L{ollamamq.sim.dialect}: what the wire dialects share;
  - L{ollamamq.sim.ollama}, L{ollamamq.sim.openai}, L{ollamamq.sim.anthropic}: one wire
    dialect each;
  - L{ollamamq.sim.engine}: slots, model loads and token pacing on an injected clock;
  - L{ollamamq.sim.resource}: L{Simulator}, the HTTP routing, errors and test hooks;
  - this module: the service.

The names most callers need are importable from here too.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from ollamamq.sim.dialect import EMBEDDING_DIMENSIONS, embeddingFor
from ollamamq.sim.options import SimulatorOptions
from ollamamq.sim.resource import Simulator

__all__ = [
    "EMBEDDING_DIMENSIONS",
    "Simulator",
    "SimulatorOptions",
    "SimulatorService",
    "embeddingFor",
    "simulatorService",
]

class _QuietSite(Site):
    """
    A site that logs neither its start nor its requests.
    """

    noisy = False

    def log(self, request: Request) -> None:
        """
        Log nothing: the demo's backends would otherwise fill the proxy's log.
        """


class SimulatorService(Service):
    """
    Serve a L{Simulator} on a stream server endpoint.

    @ivar simulator: the simulator served.
    @ivar endpoint: where to listen.
    """

    _log = Logger()

    def __init__(
        self, simulator: Simulator, endpoint: IStreamServerEndpoint, quiet: bool = False
    ) -> None:
        """
        @param simulator: the simulator to serve.
        @param endpoint: where to listen.
        @param quiet: log no access lines (for C{--demo}, inside the proxy's own log).
        """
        self.simulator = simulator
        self.endpoint = endpoint
        self.quiet = quiet
        self._listening: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self._failure: Failure | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        """
        Start listening.
        """
        super().startService()
        self._failure = None
        site = (_QuietSite if self.quiet else Site)(self.simulator.resource())
        self._listening = self.endpoint.listen(site)
        self._listening.addCallbacks(self._listened, self._listenFailed)

    def _listened(self, port: IListeningPort) -> None:
        """
        @param port: the port now listening.
        """
        self._listening = None
        self._port = port
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def _listenFailed(self, failure: Failure) -> None:
        """
        @param failure: why listening failed.
        """
        self._listening = None
        self._failure = failure
        waiters, self._waiters = self._waiters, []
        if not waiters:
            self._log.failure("simulator {name} could not listen", failure, name=self.simulator.options.name)
        for waiter in waiters:
            waiter.errback(failure)

    def whenListening(self) -> Deferred[IListeningPort]:
        """
        @return: a Deferred that fires with the listening port (use
            C{port.getHost().port} after listening on port 0), or fails with
            why listening failed.
        """
        if self._port is not None:
            return succeed(self._port)
        if self._failure is not None:
            return fail(self._failure)
        waiter: Deferred[IListeningPort] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None]:
        """
        Stop listening and drop every request in flight.

        @return: a Deferred that fires once the port is closed.
        """
        super().stopService()
        self.simulator.shutdown()
        if self._listening is not None:
            self._listening.cancel()
            self._listening = None
            return succeed(None)
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


def simulatorService(
    options: SimulatorOptions,
    endpoint: IStreamServerEndpoint,
    clock: IReactorTime,
    quiet: bool = False,
) -> SimulatorService:
    """
    Build a service that serves a new simulator on C{endpoint}.

    @param options: how the simulator behaves.
    @param endpoint: where to listen.
    @param clock: the clock driving tokens and loads (the reactor).
    @return: the service; its C{simulator} attribute is the simulator and
        C{whenListening()} gives the port.
    """
    return SimulatorService(Simulator(options, clock), endpoint, quiet)
