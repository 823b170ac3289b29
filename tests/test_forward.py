"""
Tests for L{ollamamq.forward}, driven without the route table: a real scheduler, pool and
relay, a simulated backend behind an in-memory agent, and a real twisted.web request on an
L{HTTPChannel} as the client side.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import Request
from twisted.web.http_headers import Headers

from ollamamq.backends import OLLAMA, Backend, BackendPool
from ollamamq.config import Config, ModelRule
from ollamamq.errors import BadGateway
from ollamamq.forward import Forwarder, Outgoing
from ollamamq.models import ModelCatalog
from ollamamq.relay import Relay
from ollamamq.scheduler import Job, Scheduler
from ollamamq.sim.server import Simulator, SimulatorOptions
from tests.test_relay import connectedRequest

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


class Fixture:
    """
    A forwarder in front of one simulator called C{gpu1}.
    """

    def __init__(self, models: dict | None = None, **simOptions: Any) -> None:
        self.clock = Clock()
        simOptions.setdefault("models", ("llama3:latest",))
        simOptions.setdefault("tps", 100)
        simOptions.setdefault("tokens", 3)
        self.sim = Simulator(SimulatorOptions(name="gpu1", **simOptions), self.clock)
        self.agent = RequestTraversalAgent(self.sim.resource())
        self.pool = BackendPool([Backend(name="gpu1", url="http://gpu1")])
        self.backend = self.pool.get("gpu1")
        self.pool.markOnline(self.backend, OLLAMA, ["llama3:latest"])
        config = Config(models=models or {})
        self.catalog = ModelCatalog(config.models)
        self.scheduler = Scheduler(self.pool, self.clock, config)
        self.failed: list[Backend] = []
        self.forwarder = Forwarder(
            pool=self.pool, scheduler=self.scheduler,
            relay=Relay(self.agent, self.clock, 30, 60), catalog=self.catalog,
            clock=self.clock, recheck=self.failed.append,
        )

    def clientRequest(self) -> tuple[Request, StringTransport]:
        """
        A client request on a connected channel, and the channel's transport.
        """
        channel, request = connectedRequest(b"/api/chat")
        return request, channel.transport

    def outgoing(self, body: dict, requested: str = "llama3") -> Outgoing:
        resolution = self.catalog.resolve(requested)
        return Outgoing(b"POST", b"/api/chat", Headers(), json.dumps(body).encode(),
                        resolution, requested)

    def run(self, seconds: float = 5) -> None:
        for _ in range(50):
            self.clock.advance(seconds / 50)
            self.agent.flush()


class ForwardTests(SynchronousTestCase):
    """
    L{Forwarder.forward}: the whole life of a queued request.
    """

    def test_forwardRelaysAndReleases(self) -> None:
        """
        The request is queued, granted, sent, relayed to the client request, and its slot
        is released when the answer is complete.
        """
        f = Fixture()
        request, transport = f.clientRequest()
        job = Job(user="alice", kinds=frozenset({OLLAMA}), model="llama3:latest")
        d = ensureDeferred(f.forwarder.forward(request, job, f.outgoing(CHAT)))
        f.run()
        self.successResultOf(d)
        self.assertIn(b"HTTP/1.1 200 OK", transport.value())
        self.assertIn(b'"done": true', transport.value().replace(b'":true', b'": true'))
        self.assertEqual((f.scheduler.active, f.backend.active), (0, 0))

    def test_failedOnlyBackend(self) -> None:
        """
        A backend that fails every attempt is marked failed and probed again each time;
        the client gets a 502 once the attempts are used up, and no slot is held.
        """
        f = Fixture()
        f.sim.failStatus = 502
        request, _ = f.clientRequest()
        job = Job(user="alice", kinds=frozenset({OLLAMA}), model="llama3:latest")
        d = ensureDeferred(f.forwarder.forward(request, job, f.outgoing(CHAT)))
        f.run()
        for _ in range(3):
            f.pool.markOnline(f.backend, OLLAMA, ["llama3:latest"])
            f.run()
        failure = self.failureResultOf(d, BadGateway)
        self.assertIn("backend gpu1 answered 502", failure.value.message)
        self.assertEqual(f.failed, [f.backend] * 3)
        self.assertEqual((f.scheduler.active, f.scheduler.queued), (0, 0))


class BodyTests(SynchronousTestCase):
    """
    L{Forwarder.bodyFor}: one copy of the body while queued; rewritten only when needed.
    """

    def test_clientBytesWhenNothingChanges(self) -> None:
        """
        Without rules, and with the backend spelling the model as the client did, the
        client's own bytes go out (not a re-serialisation).
        """
        f = Fixture()
        raw = b'{"model":"llama3:latest",  "messages":[]}'
        outgoing = Outgoing(b"POST", b"/api/chat", Headers(), raw,
                            f.catalog.resolve("llama3:latest"), "llama3:latest")
        self.assertIs(f.forwarder.bodyFor(f.backend, outgoing), raw)

    def test_rewrittenForRulesAndSpelling(self) -> None:
        """
        An alias is rewritten to its model, the rule's options are added, and the model is
        spelled as the granted backend spells it.
        """
        rules = {"llama3": ModelRule(name="llama3", aliases=("gpt-4o",), numCtx=4096)}
        f = Fixture(models=rules)
        f.backend.models = {"llama3:latest": "Llama3:latest"}
        body = f.forwarder.bodyFor(f.backend, f.outgoing({"model": "gpt-4o"}, "gpt-4o"))
        self.assertEqual(json.loads(body),
                         {"model": "Llama3:latest", "options": {"num_ctx": 4096}})
