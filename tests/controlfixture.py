"""
A control plane on fakes, shared by the control tests: a pool with one online backend, a
scheduler on a L{Clock}, an event hub, and a store that records what it is asked to save.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from ollamamq.backends import OLLAMA, Backend, BackendPool
from ollamamq.config import BackendConfig, Config
from ollamamq.control.actions import ControlActions
from ollamamq.control.events import EventHub
from ollamamq.scheduler import Job, Scheduler

API = frozenset({OLLAMA})


class RecordingStore:
    """
    The store's write methods, recording each call as C{(method, argument)} and
    answering at once.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def _record(self, method: str, argument: Any) -> Deferred[None]:
        self.calls.append((method, argument))
        return succeed(None)

    def putUser(self, override: Any) -> Deferred[None]:
        return self._record("putUser", override)

    def deleteUser(self, user: str) -> Deferred[None]:
        return self._record("deleteUser", user)

    def putBlock(self, network: str) -> Deferred[None]:
        return self._record("putBlock", network)

    def deleteBlock(self, network: str) -> Deferred[None]:
        return self._record("deleteBlock", network)

    def putBackend(self, override: Any) -> Deferred[None]:
        return self._record("putBackend", override)

    def deleteBackend(self, name: str) -> Deferred[None]:
        return self._record("deleteBackend", name)


class ControlFixture:
    """
    Everything the control plane acts on, wired as tap.py wires it.

    @ivar probed: backends the actions asked to probe.
    @ivar events: every event published, as C{(name, payload)}.
    """

    def __init__(self, config: Config | None = None, **configFields: Any) -> None:
        if config is None:
            fields: dict[str, Any] = {
                "backends": (BackendConfig(url="http://gpu1:11434", name="gpu1", slots=1),)
            }
            fields.update(configFields)
            config = Config(**fields)
        self.config = config
        self.clock = Clock()
        self.pool = BackendPool(
            Backend(name=b.name, url=b.url, slots=b.slots) for b in config.backends
        )
        for backend in self.pool.backends:
            self.pool.markOnline(backend, OLLAMA, ["m"])
        self.scheduler = Scheduler(self.pool, self.clock, config)
        self.store = RecordingStore()
        self.probed: list[Backend] = []
        self.nextConfig: Config | Exception | None = None
        self.actions: ControlActions
        self.hub = EventHub(self.clock, lambda: self.actions.totals())
        self.events: list[tuple[str, dict]] = []

        class Recorder:
            def event(_, name: str, payload: dict) -> None:
                self.events.append((name, payload))

        self.hub.subscribe(Recorder())
        self.actions = ControlActions(
            config=config,
            pool=self.pool,
            scheduler=self.scheduler,
            store=self.store,
            events=self.hub,
            probe=self.probed.append,
            loadConfig=self._load,
        )

    def _load(self) -> Config:
        """
        What a reload reads: C{nextConfig} (raised when it is an exception).
        """
        if isinstance(self.nextConfig, Exception):
            raise self.nextConfig
        assert self.nextConfig is not None, "set nextConfig first"
        return self.nextConfig

    def enqueue(self, user: str, requestId: str | None = None, peer: str | None = None,
                model: str = "m:latest") -> Deferred:
        """
        Queue a request; failures are recorded on the Deferred (not raised).
        """
        d = self.scheduler.enqueue(Job(user=user, kinds=API, model=model, peer=peer,
                                       requestId=requestId))
        outcome: list = []
        d.addBoth(outcome.append)
        d.outcome = outcome  # type: ignore[attr-defined]
        return d
