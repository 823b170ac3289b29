# -*- test-case-name: tests.test_sim -*-
"""
C{ollamamq-sim} (also C{python -m ollamamq.sim}): run a simulated Ollama, OpenAI-only or
llama-server-like server until SIGINT/SIGTERM.

Once listening it prints exactly one line to stdout,
C{ollamamq-sim listening on http://HOST:PORT}, so scripts and integration
tests that pass C{--port 0} can read the port that was picked.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore, IReactorTCP, IReactorTime
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.web.server import Site

from ollamamq.sim.server import Simulator, SimulatorOptions


class Options(usage.Options):
    """
    Command line of C{ollamamq-sim}.

    @ivar simulatorOptions: the validated L{SimulatorOptions}, after parsing.
    """

    synopsis = "Usage: ollamamq-sim [--port N] [options]"
    longdesc = (
        "Run a simulated LLM server that speaks the Ollama API (/api/* and /v1/*), "
        "only the OpenAI API (/v1/*), or imitates llama.cpp's llama-server (/v1/*, "
        "/health, /props), streaming deterministic tokens at a fixed rate; all serve "
        "Anthropic's /v1/messages unless --no-messages. GET /sim/stats shows counters "
        "and a work log, GET /sim/requests every request's headers."
    )
    optFlags = [
        ["verbose", "v", "Log every request to stderr (default: warnings only)."],
        ["no-messages", None, "Serve no Anthropic Messages routes (/v1/messages)."],
    ]
    optParameters = [
        ["port", "p", "11434", "TCP port to listen on; 0 picks a free one."],
        ["host", None, "127.0.0.1", "Interface to listen on."],
        [
            "api",
            None,
            "ollama",
            "API family: ollama (/api/* and /v1/*), openai (/v1/* only) or llama-server "
            "(/v1/*, /health, /props; --load-delay is its startup load).",
        ],
        ["models", None, "llama3:latest", "Comma-separated model names to serve."],
        ["tps", None, "50", "Tokens per second per stream; 0 = as fast as possible."],
        ["tokens", None, "20", "Default answer length in tokens."],
        ["load-delay", None, "0", "Seconds to load a model that is not loaded."],
        ["slots", None, "1", "Generations run at once (like OLLAMA_NUM_PARALLEL)."],
        ["max-loaded", None, "1", "Models kept loaded (least recently used is evicted)."],
        ["name", None, "sim", "Name reported in the X-Sim-Backend response header."],
    ]
    # Numbers are converted in postOptions rather than by coercers, whose
    # errors read "Parameter type enforcement failed" without the option.
    _integers = ("port", "tokens", "slots", "max-loaded")
    _floats = ("tps", "load-delay")

    def __init__(self) -> None:
        """
        Set the defaults that are not ordinary parameters.
        """
        super().__init__()
        self["version"] = SimulatorOptions().version

    def opt_version(self, version: str) -> None:
        """
        Version reported by /api/version (default: a recent Ollama release).
        """
        # usage.Options' own --version prints Twisted's version; the
        # simulator's --version takes a value instead.
        self["version"] = version

    def postOptions(self) -> None:
        """
        Check the values together and build L{SimulatorOptions}.

        @raise usage.UsageError: when a value is out of range.
        """
        for name in self._integers + self._floats:
            kind = int if name in self._integers else float
            try:
                self[name] = kind(self[name])
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise usage.UsageError(f"--{name} must be {what}, not {self[name]!r}") from None
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError(f"--port must be between 0 and 65535, not {self['port']}")
        names = {
            "loadDelay": "--load-delay",
            "maxLoaded": "--max-loaded",
        }
        try:
            self.simulatorOptions = SimulatorOptions(
                api=self["api"],
                models=self["models"],
                tps=self["tps"],
                tokens=self["tokens"],
                loadDelay=self["load-delay"],
                slots=self["slots"],
                maxLoaded=self["max-loaded"],
                messages=not self["no-messages"],
                version=self["version"],
                name=self["name"],
            )
        except ValueError as error:
            message = str(error)
            option = message.split(" ", 1)[0]
            message = names.get(option, "--" + option) + message[len(option) :]
            raise usage.UsageError(message) from None


def _startLogging(verbose: bool) -> None:
    """
    Send Twisted's log to stderr, keeping stdout for the listening line.

    @param verbose: whether to log informational events too.
    """
    level = LogLevel.info if verbose else LogLevel.warn
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def _serve(reactor: Any, config: Options) -> None:
    """
    Listen, announce the address, and serve until the reactor stops.

    @param reactor: the reactor (an L{IReactorTCP}, L{IReactorTime} and
        L{IReactorCore}).
    @param config: the parsed command line.
    """
    clock: IReactorTime = reactor
    simulator = Simulator(config.simulatorOptions, clock)
    host: str = config["host"]
    tcp: IReactorTCP = reactor
    endpointType = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    endpoint = endpointType(tcp, config["port"], interface=host)
    try:
        port = await endpoint.listen(Site(simulator.resource()))
    except CannotListenError as error:
        sys.stderr.write(f"ollamamq-sim: cannot listen on {host}:{config['port']}: {error.socketError}\n")
        raise SystemExit(1)
    address = port.getHost()
    shown = f"[{address.host}]" if ":" in address.host else address.host
    sys.stdout.write(f"ollamamq-sim listening on http://{shown}:{address.port}\n")
    sys.stdout.flush()

    def shutDown() -> Deferred[None] | None:
        """
        Before the reactor stops (SIGINT/SIGTERM): drop requests in flight
        and close the port.
        """
        simulator.shutdown()
        return port.stopListening()

    core: IReactorCore = reactor
    core.addSystemEventTrigger("before", "shutdown", shutDown)
    # Serve until a signal stops the reactor; react() then exits with 0.
    await Deferred()


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run C{ollamamq-sim}.

    @param argv: the arguments (without the program name); C{sys.argv[1:]}
        when L{None}.
    @raise SystemExit: always: 2 for a usage error, else when the server
        stops.
    """
    config = Options()
    try:
        config.parseOptions(None if argv is None else list(argv))
    except usage.UsageError as error:
        sys.stderr.write(f"{config}\nollamamq-sim: error: {error}\n")
        raise SystemExit(2)
    _startLogging(config["verbose"])
    react(lambda reactor: Deferred.fromCoroutine(_serve(reactor, config)))


if __name__ == "__main__":
    main()
