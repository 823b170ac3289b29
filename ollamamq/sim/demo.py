# -*- test-case-name: tests.test_tap -*-
"""
C{--demo}: two simulated Ollama backends started in-process on free loopback ports, so a
new user sees the proxy queue, route and stream with no GPU and no Ollama.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort

from ollamamq.backends import Backend
from ollamamq.sim.server import SimulatorOptions, simulatorService

DEMO_BACKENDS = (
    SimulatorOptions(
        name="demo-1",
        models=("llama3.2:latest", "nomic-embed-text:latest"),
        tps=20,
        tokens=40,
        loadDelay=0.5,
        slots=2,
        maxLoaded=2,
    ),
    SimulatorOptions(
        name="demo-2",
        models=("llama3.2:latest", "qwen2.5:0.5b"),
        tps=30,
        tokens=40,
        loadDelay=0.5,
        slots=1,
    ),
)


class DemoBackends(MultiService):
    """
    Runs the demo simulators and hands each to C{onReady} as a L{Backend} once it listens.
    """

    def __init__(self, reactor: Any, onReady: Callable[[Backend], None]) -> None:
        super().__init__()
        self._onReady = onReady
        for options in DEMO_BACKENDS:
            endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
            sim = simulatorService(options, endpoint, reactor, quiet=True)
            sim.setServiceParent(self)

    def startService(self) -> None:
        """
        Start the simulators; announce each backend when its port is known.
        """
        super().startService()
        for sim in self:
            sim.whenListening().addCallback(self._listening, sim.simulator.options)

    def _listening(self, port: IListeningPort, options: SimulatorOptions) -> None:
        self._onReady(
            Backend(
                name=options.name,
                url=f"http://127.0.0.1:{port.getHost().port}",
                slots=options.slots,
            )
        )
