# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin's options and the one place that wires the daemon's objects together.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site
from treq.client import HTTPClient
from zope.interface import implementer

from ollamamq.access import PUBLIC, AccessGate
from ollamamq.aggregate import Aggregator
from ollamamq.api import ProxyAPI
from ollamamq.backends import Backend, BackendPool
from ollamamq.channel import guardedChannel
from ollamamq.config import (
    Config,
    ConfigError,
    backendsFromURLs,
    buildConfig,
    loadConfigFile,
    logFormat,
)
from ollamamq.control.actions import ControlActions
from ollamamq.control.amp import ReloadFailed
from ollamamq.control.events import EventHub
from ollamamq.control.http import AdminAPI
from ollamamq.control.server import ControlFactory, controlService
from ollamamq.forward import Forwarder
from ollamamq.health import HealthChecker
from ollamamq.identity import IdentityResolver
from ollamamq.keys import MintedKeys, loadKeys
from ollamamq.limits import RateLimiter, TokenBudget
from ollamamq.models import ModelCatalog
from ollamamq.metrics import Metrics
from ollamamq.relay import Relay
from ollamamq.requestlog import RequestLog
from ollamamq.scheduler import Scheduler
from ollamamq.store import Store, StoreError, StoreService, loadState
from ollamamq.tracking import Observer

log = Logger()

# How long a stopping daemon lets running requests finish before cutting them.
DRAIN_GRACE = 30.0

# Descriptors the daemon needs beyond one per queued connection: backend connections,
# listening sockets, log files, the state database.
SPARE_DESCRIPTORS = 256


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    return port


def _seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"expected a positive number of seconds, got {value}")
    return seconds


class Options(usage.Options):
    """
    C{twistd ollamamq} options (DESIGN.md section 2). After parsing, C{self.config} holds
    the merged, validated L{Config}.
    """

    synopsis = "[options]"
    longdesc = (
        "A fair-share queueing proxy for Ollama and OpenAI-compatible LLM servers. "
        "Each user gets a queue; backends get no more requests than they have slots."
    )
    optFlags = [
        ["allow-all-routes", None, "Proxy unknown paths too (queued, any fitting backend)."],
        ["demo", None, "Start two simulated backends in-process; no Ollama needed."],
    ]
    optParameters = [
        ["port", "p", None, "Listen on 127.0.0.1:PORT [default: 11435].", _port],
        ["backends", None, None, "Comma-separated backend URLs."],
        ["config", "c", None, "TOML config file; command-line options override it."],
        ["timeout", "t", None, "Idle timeout in seconds between backend bytes [default: 300].",
         _seconds],
        ["health-interval", None, None, "Backend probe period in seconds [default: 10].",
         _seconds],
        ["control", None, None, "AMP control socket path [default: ollamamq.sock]."],
        ["state", None, None, "SQLite state file [default: ollamamq.db]."],
        ["log-format", None, None, "Log lines as text or json (one JSON object per line) "
         "[default: text]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["backend"] = []
        self.config: Config | None = None
        self.environ: dict[str, str] = dict(os.environ)

    def opt_listen(self, endpoint: str) -> None:
        """
        Twisted server endpoint to listen on, repeatable (tcp:11435:interface=0.0.0.0,
        systemd:domain=INET:index=0).
        """
        self["listen"].append(endpoint)

    def opt_backend(self, url: str) -> None:
        """
        A backend URL, repeatable [default: http://localhost:11434].
        """
        self["backend"].append(url)

    opt_b = opt_backend

    def postOptions(self) -> None:
        """
        Merge file, environment and command line into C{self.config}.
        """
        try:
            fileFields = loadConfigFile(self["config"]) if self["config"] else {}
            self.config = buildConfig(fileFields, self._cliFields(), self.environ)
            # Model rules can clash only once names are canonicalised; check at startup.
            ModelCatalog(self.config.models)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self.config.logFormat == "json" and getattr(self, "parent", None) is not None:
            # twistd starts its log observer after makeService, from its own options (a
            # name it imports once every option is parsed).
            self.parent["logger"] = "ollamamq.logs.jsonObserverFactory"
        for description in self.config.listen:
            try:
                # Parsing only (no reactor: twistd installs the real one later).
                endpoints.serverFromString(None, description)
            except KeyError as e:
                raise usage.UsageError(
                    f"--listen {description!r}: systemd passed no socket named {e}"
                ) from None
            except IndexError:
                raise usage.UsageError(
                    f"--listen {description!r}: systemd passed fewer sockets than that index"
                ) from None
            except (ValueError, TypeError) as e:
                raise usage.UsageError(f"bad --listen endpoint {description!r}: {e}") from None

    def reloadConfig(self) -> Config:
        """
        Read the config file again, merged with the same command line and environment as
        at startup (the command line still wins).

        @raise ConfigError: when it is unreadable or invalid, models clashing included.
        """
        if not self["config"]:
            raise ConfigError("the daemon was started without --config: nothing to reload")
        config = buildConfig(loadConfigFile(self["config"]), self._cliFields(), self.environ)
        ModelCatalog(config.models)
        return config

    def _cliFields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        listen = list(self["listen"])
        if self["port"] is not None:
            listen.insert(0, f"tcp:{self['port']}:interface=127.0.0.1")
        if listen:
            fields["listen"] = listen
        urls = list(self["backend"])
        if self["backends"]:
            urls += [u for u in self["backends"].split(",") if u.strip()]
        if urls:
            fields["backends"] = backendsFromURLs(urls, "--backend")
        for option, field in (
            ("timeout", "timeout"),
            ("health-interval", "healthInterval"),
            ("control", "control"),
            ("state", "state"),
        ):
            if self[option] is not None:
                fields[field] = self[option]
        if self["log-format"] is not None:
            try:
                fields["logFormat"] = logFormat("--log-format", self["log-format"])
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        if self["allow-all-routes"]:
            fields["allowAllRoutes"] = True
        if self["demo"]:
            fields["demo"] = True
        return fields


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    Backend connections come and go all day; their factories' start/stop lines are noise.
    """

    noisy = False


class _QuietConnectionPool(HTTPConnectionPool):
    """
    A persistent connection pool that does not log every new backend connection.
    """

    _factory = _QuietClientFactory


@implementer(IStreamServerEndpoint)
class _AnnouncedEndpoint:
    """
    A server endpoint that logs the address it ends up listening on, so a port chosen by
    the system (C{tcp:0}) can be found in the log.
    """

    def __init__(self, description: str, endpoint: IStreamServerEndpoint) -> None:
        self._description = description
        self._endpoint = endpoint

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        d = self._endpoint.listen(factory)

        def announce(port: IListeningPort) -> IListeningPort:
            address = port.getHost()
            host, number = getattr(address, "host", None), getattr(address, "port", None)
            if number is not None:
                scheme = "https" if self._description.startswith("ssl:") else "http"
                log.info("ollamamq listening on {scheme}://{host}:{port}/", scheme=scheme,
                         host=host, port=number)
            else:
                log.info("ollamamq listening on {description}", description=self._description)
            return port

        return d.addCallback(announce)


class _Site(Site):
    """
    A site that leaves out twisted.web's access line for proxied requests, which have
    the proxy's own (L{ollamamq.requestlog.logAccess}) instead: one line per request.
    """

    def log(self, request: Any) -> None:
        if not getattr(request, "ollamamqLogged", False):
            super().log(request)


class _DrainService(service.Service):
    """
    On stop: refuse new requests (queued ones get 503), let running ones finish for a
    grace period, then close the idle backend connections. Whatever still runs after the
    grace period is cut when the reactor stops.
    """

    def __init__(self, scheduler: Scheduler, httpPool: HTTPConnectionPool, clock: Any,
                 grace: float) -> None:
        self._scheduler = scheduler
        self._httpPool = httpPool
        self._clock = clock
        self._grace = grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._scheduler.stop()
        deadline = self._clock.seconds() + self._grace

        def check() -> None:
            if self._scheduler.active == 0 or self._clock.seconds() >= deadline:
                poll.stop()

        poll = LoopingCall(check)
        poll.clock = self._clock
        d = poll.start(0.1, now=True)
        d.addCallback(lambda _: self._httpPool.closeCachedConnections())
        return d


class _FileLimitService(service.Service):
    """
    At start, raise the soft limit on open files to the hard limit, and warn when even that
    cannot hold a connection per queued request (C{max_queued_total}).
    """

    def __init__(self, needed: int) -> None:
        self._needed = needed

    def startService(self) -> None:
        super().startService()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError) as e:
                log.warn("Could not raise the open-file limit from {soft}: {error}",
                         soft=soft, error=e)
        if soft != resource.RLIM_INFINITY and soft < self._needed:
            log.warn(
                "The open-file limit is {limit}, below the {needed} that max_queued_total "
                "connections need; raise it (systemd: LimitNOFILE=) or lower "
                "max_queued_total",
                limit=soft, needed=self._needed,
            )


class _ReloadOnSignal(service.Service):
    """
    Reload the config on SIGHUP (what C{systemctl reload} sends, see the unit's
    C{ExecReload}). The handler only schedules the reload on the reactor, which runs it
    between events like any other work.
    """

    def __init__(self, reactor: Any, reload: Any, signum: int = signal.SIGHUP) -> None:
        self._reactor = reactor
        self._reload = reload
        self._signum = signum
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(self._signum, self._received)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None

    def _received(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        Reload; a refused config was logged by the reload itself, the old one stays.
        """
        log.info("SIGHUP: reloading the config")
        try:
            self._reload()
        except ReloadFailed:
            pass
        except Exception:
            log.failure("Reload failed")


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """
    Build the daemon: HTTP front, scheduler, backend pool, health checks.

    @param reactor: defaults to the global reactor; tests pass a C{MemoryReactorClock}.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    config = options.config
    assert config is not None, "Options.parseOptions() was not called"

    try:
        # Before anything serves: saved blocks and policies apply from the first request,
        # and an unusable state file stops startup with its reason.
        state = loadState(config.state)
    except StoreError as e:
        # One clear line and exit status 1, not a traceback: the operator has to act.
        raise SystemExit(f"ollamamq: {e}") from None

    top = service.MultiService()
    store = Store(config.state, reactor, reactor)
    # First child: stopped last, after everything that may still save something.
    StoreService(store).setServiceParent(top)
    httpPool = _QuietConnectionPool(reactor, persistent=True)
    httpPool.maxPersistentPerHost = max([b.slots or 1 for b in config.backends] + [4]) * 2
    agent = Agent(reactor, pool=httpPool)
    # For the one retry of a request lost on a stale keep-alive connection.
    freshAgent = Agent(reactor, pool=_QuietConnectionPool(reactor, persistent=False))
    http = HTTPClient(agent)

    pool = BackendPool(
        Backend(name=b.name, url=b.url, slots=b.slots or 1, slotsFromBackend=b.slots is None,
                apiKey=b.apiKey)
        for b in config.backends
    )
    scheduler = Scheduler(pool, reactor, config)
    catalog = ModelCatalog(config.models)
    metrics = Metrics(scheduler, pool, topUsers=config.metricsTopUsers)
    requestLog = RequestLog(store.runInteraction, reactor,
                            retentionDays=config.logRetentionDays)
    health = HealthChecker(pool, http, reactor, config.healthInterval, config.probeTimeout,
                           downAfter=config.downAfter)
    health.onProbe = lambda backend, latency: metrics.probed(backend.name, latency)
    relay = Relay(agent, reactor, config.timeout, config.firstByteTimeout, freshAgent)
    forwarder = Forwarder(
        pool=pool,
        scheduler=scheduler,
        relay=relay,
        catalog=catalog,
        clock=reactor,
        # A backend that failed a request is probed again at once: a restart is brief.
        recheck=health.probeSoon,
        downAfter=config.downAfter,
        observer=Observer(reactor, metrics, requestLog),
    )
    identity = IdentityResolver(config)
    try:
        # Before anything serves: a minted key works from the first request on.
        loadKeys(config.state, identity)
    except StoreError as e:
        raise SystemExit(f"ollamamq: {e}") from None
    api = ProxyAPI(
        config=config,
        pool=pool,
        scheduler=scheduler,
        forwarder=forwarder,
        identity=identity,
        catalog=catalog,
        aggregator=Aggregator(pool, http, reactor, catalog, config.probeTimeout,
                              retryAfter=config.healthInterval),
        metrics=metrics,
        runQuery=store.runInteraction,
        requestLog=requestLog,
        keys=MintedKeys(store, identity, reactor),
    )

    def reconfigure(new: Config) -> None:
        # The components that hold the config take the reloaded one; queues, counters,
        # connections and running streams are untouched. The model catalog is immutable:
        # a new one replaces it.
        newCatalog = ModelCatalog(new.models)
        api.config = new
        api.catalog = newCatalog
        api.aggregator.catalog = newCatalog
        forwarder.catalog = newCatalog
        forwarder.downAfter = new.downAfter
        # Body and header limits: requests from now on are read under the new rules.
        site.requestFactory = api.frontRules().requestFactory()
        api.identity.reconfigure(new)
        relay.reconfigure(new)
        health.reconfigure(new)
        requestLog.retentionDays = new.logRetentionDays
        budget.reconfigure(new)

    hub = EventHub(reactor, lambda: actions.totals())
    forwarder.observer.publish = hub.publish
    actions = ControlActions(
        config=config,
        pool=pool,
        scheduler=scheduler,
        store=store,
        events=hub,
        probe=health.probe,
        loadConfig=options.reloadConfig if options["config"] else None,
        reconfigure=[reconfigure],
    )
    actions.restore(state)
    api.control = actions
    api.admin = AdminAPI(
        actions=actions,
        hub=hub,
        identify=lambda headers, peer: api.identity.identify(headers, peer).user,
        isAdmin=lambda headers: api.identity.isAdmin(headers),
    )
    _ReloadOnSignal(reactor, actions.reload).setServiceParent(top)
    controlService(reactor, config.control, ControlFactory(actions, hub, api.keys)).setServiceParent(top)

    _FileLimitService(config.maxQueuedTotal + SPARE_DESCRIPTORS).setServiceParent(top)
    # Stopped before the store: the request log writes its last batch while stopping.
    requestLog.setServiceParent(top)
    _DrainService(scheduler, httpPool, reactor, min(DRAIN_GRACE, config.timeout)).setServiceParent(top)
    health.service().setServiceParent(top)
    if config.demo:
        from ollamamq.sim.demo import DemoBackends

        def demoReady(backend: Backend) -> None:
            pool.add(backend)
            health.probe(backend)

        DemoBackends(reactor, demoReady).setServiceParent(top)
    # Prometheus scrapers carry no key: with metrics_public, /metrics is public.
    public = PUBLIC | ({b"/metrics"} if config.metricsPublic else frozenset())
    budget = TokenBudget(config)
    forwarder.observer.budget = budget
    site = _Site(AccessGate(api.resource(), identity, RateLimiter(reactor, config), public,
                            budget), reactor=reactor)
    site.requestFactory = api.frontRules().requestFactory()
    site.protocol = guardedChannel(reactor, config.clientTimeout, config.maxHeaderBytes)
    for description in config.listen:
        endpoint = _AnnouncedEndpoint(description, endpoints.serverFromString(reactor, description))
        listener = StreamServerEndpointService(endpoint, site)
        # As twisted.application.strports does: a port that cannot be bound fails startup
        # loudly instead of leaving a daemon that serves nothing.
        listener._raiseSynchronously = True
        listener.setServiceParent(top)
    return top

