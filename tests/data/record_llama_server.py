"""
Record real llama-server answers into tests/data/ for the translation tests.

Run once, by hand, after .ci/run has built llama-server into the cache::

    PYTHONPATH=. /work/venv/bin/python tests/data/record_llama_server.py

It starts llama-server on 127.0.0.1 (a port it picks) with the cached Gemma 3 270M GGUF
and the shipped Gemma chat template, as L{tests.llama} does, twice: once for chat and completions, once with --embeddings for embeddings. Each
exchange is written to tests/data/llama-server/NAME.json as {"request", "status",
"content_type", "body"} (body as text: JSON, or the raw SSE stream), then the server is
stopped. temperature 0 and a fixed seed keep the answers stable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.llama import GEMMA_MODEL, GEMMA_TEMPLATE, realBackend  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama-server")

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours of the rainbow."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["colour", "count"]}
SAMPLING = {"temperature": 0, "seed": 42}

EXCHANGES = {
    "models": ("GET", "/v1/models", None),
    "props": ("GET", "/props", None),
    "chat_whole": ("POST", "/v1/chat/completions",
                   dict(SAMPLING, messages=CHAT, max_tokens=24, stream=False)),
    "chat_stream": ("POST", "/v1/chat/completions",
                    dict(SAMPLING, messages=CHAT, max_tokens=24, stream=True,
                         stream_options={"include_usage": True})),
    "chat_length_stream": ("POST", "/v1/chat/completions",
                           dict(SAMPLING, messages=CHAT, max_tokens=3, stream=True,
                                stream_options={"include_usage": True})),
    "chat_tools_whole": ("POST", "/v1/chat/completions",
                         dict(SAMPLING, messages=[{"role": "user", "content": "Weather in Paris?"}],
                              tools=TOOLS, tool_choice="required", max_tokens=64, stream=False)),
    "chat_tools_stream": ("POST", "/v1/chat/completions",
                          dict(SAMPLING, messages=[{"role": "user", "content": "Weather in Paris?"}],
                               tools=TOOLS, tool_choice="required", max_tokens=64, stream=True,
                               stream_options={"include_usage": True})),
    "chat_schema_whole": ("POST", "/v1/chat/completions",
                          dict(SAMPLING, messages=CHAT, max_tokens=200, stream=False,
                               response_format={"type": "json_schema", "json_schema": {
                                   "name": "response", "schema": SCHEMA, "strict": True}})),
    "completion_whole": ("POST", "/v1/completions",
                         dict(SAMPLING, prompt="1, 2, 3,", max_tokens=8, stream=False)),
    "completion_stream": ("POST", "/v1/completions",
                          dict(SAMPLING, prompt="1, 2, 3,", max_tokens=8, stream=True,
                               stream_options={"include_usage": True})),
    "chat_error": ("POST", "/v1/chat/completions",
                   dict(SAMPLING, messages=[{"role": "user", "content": "x " * 5000}], max_tokens=4)),
}
EMBEDDINGS = {
    "embeddings": ("POST", "/v1/embeddings",
                   {"input": ["The sky is blue.", "Grass is green."], "encoding_format": "float"}),
}


def call(url: str, method: str, path: str, body: dict | None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=300)
    except urllib.error.HTTPError as e:
        response = e
    raw = response.read()
    return {"request": {"method": method, "path": path, "body": body},
            "status": response.status if hasattr(response, "status") else response.code,
            "content_type": response.headers.get("Content-Type"),
            "body": raw.decode("utf-8")}


def serve(extra: list[str]) -> tuple[subprocess.Popen, str]:
    binary, model = realBackend()
    argv = [binary, "--model", model, "--alias", GEMMA_MODEL, "--host", "127.0.0.1",
            "--port", "0", "--parallel", "2", "--ctx-size", "2048", "--threads", "2",
            "--jinja", "--chat-template-file", GEMMA_TEMPLATE, "--no-webui", *extra]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", line)
        if match:
            break
    else:
        raise SystemExit("llama-server exited before it listened")
    # Keep reading its output so a full pipe never stalls it.
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    url = match.group(1).decode()
    for _ in range(600):
        try:
            if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                return process, url
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise SystemExit("llama-server never became healthy")


def record(exchanges: dict, extra: list[str]) -> None:
    process, url = serve(extra)
    try:
        for name, (method, path, body) in exchanges.items():
            result = call(url, method, path, body)
            with open(os.path.join(OUT, name + ".json"), "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
            print(name, result["status"], len(result["body"]))
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    record(EXCHANGES, [])
    record(EMBEDDINGS, ["--embeddings", "--pooling", "mean"])
    with open(os.path.join(OUT, "README"), "w") as f:
        f.write(f"Recorded {time.strftime('%Y-%m-%d')} from llama-server ({realBackend()[0]}) "
                "with tests/data/record_llama_server.py.\n")


if __name__ == "__main__":
    main()
