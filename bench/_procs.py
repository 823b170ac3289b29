"""
Shared helpers for the end-to-end benchmarks: start a simulator (C{ollamamq-sim}) or the
proxy (C{twistd -n ollamamq}) as a subprocess on 127.0.0.1 with a system-chosen port, wait
for the lines that announce its URL (and, for the proxy, its backends coming online), and
stop it again.

Readiness comes from the processes' own output, as in C{tests/harness.py}, never from
sleeping. Each child's stdout and stderr are merged and read by a daemon thread, so a
chatty child (the simulator with C{-v} logs two lines per request) never blocks on a full
pipe. Use L{Processes} as a context manager: every process it started is terminated (then
killed, if it does not exit) on the way out, whatever happened.

Also here: reading a process's CPU time from C{/proc/PID/stat}, small JSON-over-HTTP
helpers, result bookkeeping, and a small raw-socket HTTP/1.1 client (L{Connection},
L{Response}, L{readMany}) that times headers, first body byte and end of a response and
counts body bytes and lines at well under a microsecond per chunk.
"""

from __future__ import annotations

import json
import os
import platform
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from http.client import HTTPConnection
from typing import Any
from urllib.parse import urlsplit

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")

SIM_LINE = r"ollamamq-sim listening on (http://\S+)"
PROXY_LINE = r"ollamamq listening on (http://[\d.]+:\d+)/"
ONLINE_LINE = r"Backend (\S+) \(\S+\) is online"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _script(name: str) -> list[str]:
    """
    The command for a console script installed next to this interpreter.
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return [path]
    if name == "twistd":
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    raise FileNotFoundError(name)


class Child:
    """
    One child process whose output lines can be waited for.

    @ivar name: a label for messages.
    @ivar popen: the L{subprocess.Popen}.
    @ivar url: the URL it announced (set by L{Processes}).
    """

    def __init__(self, name: str, argv: list[str], keep: int = 20_000) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            [PROJECT_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        self.name = name
        self.argv = argv
        self.url: str | None = None
        self.lines: deque[str] = deque(maxlen=keep)
        self._seen = 0
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._seen += 1
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def waitFor(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[re.Match[str]]:
        """
        Wait until output lines matching C{pattern} give C{count} distinct first groups
        (or C{count} matches when the pattern has no group); return the matches.

        @raise RuntimeError: the process exited or C{timeout} passed first.
        """
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matches = [m for m in map(compiled.search, self.lines) if m]
                distinct = {m.group(1) if m.groups() else i for i, m in enumerate(matches)}
                if len(distinct) >= count:
                    return matches
                if self.popen.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.popen.returncode} before {pattern!r}:\n"
                        + "\n".join(list(self.lines)[-30:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"{self.name}: no {pattern!r} within {timeout:g}s:\n"
                        + "\n".join(list(self.lines)[-30:])
                    )
                self._cond.wait(min(left, 0.5))

    def grep(self, pattern: str) -> list[str]:
        """
        The output lines (of the last C{keep}) matching C{pattern}.
        """
        compiled = re.compile(pattern)
        with self._cond:
            return [line for line in self.lines if compiled.search(line)]

    def cpuSeconds(self) -> float:
        """
        User + system CPU seconds used so far, from C{/proc/PID/stat} (0.0 when unreadable).
        """
        return cpuSeconds(self.pid)

    def stop(self, grace: float = 10.0) -> None:
        """
        SIGTERM, wait up to C{grace} seconds, then SIGKILL; always reaps the process.
        """
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(2)


def cpuSeconds(pid: int) -> float:
    """
    User + system CPU seconds of process C{pid} (all its threads), from C{/proc/PID/stat}.
    Resolution is one clock tick (usually 10 ms).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; the fields after it start at ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


class Processes:
    """
    Starts simulators and proxies and stops all of them on exit (use as a context manager).
    """

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="ollamamq-bench-")

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopAll()

    def stopAll(self) -> None:
        """
        Stop every child, newest first (the proxy before its backends), then clean up.
        """
        while self.children:
            child = self.children.pop()
            try:
                child.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: stopping {child.name} (pid {child.pid}): {e}", file=sys.stderr)
        self._tmp.cleanup()

    def stop(self, child: Child) -> None:
        """
        Stop one child now.
        """
        if child in self.children:
            self.children.remove(child)
        child.stop()

    def sim(self, *args: str, name: str = "sim", timeout: float = 30.0) -> Child:
        """
        Start C{python -m ollamamq.sim --port 0 -v ARGS}; return it once it announced its URL
        (in C{child.url}).
        """
        argv = [sys.executable, "-m", "ollamamq.sim", "--port", "0", "-v", "--name", name, *args]
        child = Child(name, argv)
        self.children.append(child)
        child.url = child.waitFor(SIM_LINE, timeout=timeout)[0].group(1)
        return child

    def proxy(
        self, *args: str, backends: int = 1, config: str | None = None, timeout: float = 30.0
    ) -> Child:
        """
        Start C{twistd -n --pidfile= ollamamq --listen tcp:0:interface=127.0.0.1 ARGS}, with
        its control socket and state file in a temporary directory and, when C{config} (TOML
        text) is given, C{-c} a file holding it. Return it once it listens (URL in
        C{child.url}) and C{backends} distinct backends were logged online.
        """
        n = len(self.children)
        extra: list[str] = []
        if config is not None:
            path = os.path.join(self._tmp.name, f"proxy{n}.toml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(config)
            extra = ["-c", path]
        argv = _script("twistd") + [
            "-n",
            "--pidfile=",
            "ollamamq",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--control",
            os.path.join(self._tmp.name, f"control{n}.sock"),
            "--state",
            os.path.join(self._tmp.name, f"state{n}.db"),
            *extra,
            *args,
        ]
        child = Child("proxy", argv)
        self.children.append(child)
        child.url = child.waitFor(PROXY_LINE, timeout=timeout)[0].group(1)
        if backends:
            child.waitFor(ONLINE_LINE, count=backends, timeout=timeout)
        return child


def hostPort(url: str) -> tuple[str, int]:
    """
    C{("127.0.0.1", 1234)} for C{"http://127.0.0.1:1234"}.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


def getJSON(url: str, path: str, timeout: float = 10.0) -> Any:
    """
    C{GET url+path} and decode its JSON body.
    """
    host, port = hostPort(url)
    conn = HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def postJSON(url: str, path: str, payload: Any = None, headers: dict | None = None,
             timeout: float = 30.0) -> tuple[int, bytes]:
    """
    C{POST url+path} with a JSON body; return the status and the whole body.
    """
    host, port = hostPort(url)
    conn = HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(payload if payload is not None else {}),
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def percentile(values: list[float], p: float) -> float:
    """
    The C{p}th percentile (0-100) by linear interpolation between closest ranks.
    """
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def environment() -> dict[str, Any]:
    """
    Where the numbers come from.
    """
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def writeResults(name: str, payload: dict[str, Any]) -> str:
    """
    Write C{payload} (plus the environment) to C{bench/results/NAME.json}; return the path.
    """
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"benchmark": name, "environment": environment(), **payload}, f, indent=2)
        f.write("\n")
    return path


# --- a small HTTP/1.1 client ---------------------------------------------------------------
#
# Raw sockets, persistent connections, and an incremental response parser (Content-Length or
# chunked) that records when the headers, the first body byte and the last byte arrived, and
# counts body bytes and newline-terminated lines without keeping the body.
#
# Why not http.client: it decodes a chunked body with a readline() and a read() per chunk, and
# the streams measured here are one chunk per token. Here a whole recv() buffer (up to
# 256 KiB) is parsed with bytearray.find()/count() calls, so the client costs well under a
# microsecond per chunk, and one Python thread reads several streams at once through
# readMany() (a selectors loop), without GIL contention between reader threads.

RECV_SIZE = 256 * 1024

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _DONE = range(7)


class Response:
    """
    One response being parsed.

    @ivar sentAt: C{time.perf_counter()} just before the request was written.
    @ivar headersAt: when the end of the response headers arrived.
    @ivar firstByteAt: when the first body byte arrived (L{None} for an empty body).
    @ivar doneAt: when the body was complete.
    @ivar bodyBytes: body bytes (after de-chunking).
    @ivar lines: newline characters in the body (NDJSON lines).
    @ivar chunks: transfer chunks received (0 for a Content-Length body).
    @ivar tail: the last up to 512 body bytes (to check the stream's last line).
    """

    def __init__(self, sentAt: float) -> None:
        self.sentAt = sentAt
        self.headersAt: float | None = None
        self.firstByteAt: float | None = None
        self.doneAt: float | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.bodyBytes = 0
        self.lines = 0
        self.chunks = 0
        self.tail = b""
        self.keepAlive = True
        self._state = _HEAD
        self._left = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def _body(self, buf: bytearray, start: int, end: int, now: float) -> None:
        if end <= start:
            return
        if self.firstByteAt is None:
            self.firstByteAt = now
        self.bodyBytes += end - start
        self.lines += buf.count(b"\n", start, end)
        self.tail = (self.tail + bytes(buf[max(start, end - 512):end]))[-512:]

    def feed(self, buf: bytearray, now: float) -> int:
        """
        Parse what C{buf} holds; return how many bytes were consumed (the caller drops
        them). Stops at the end of this response (a pipelined next one stays in C{buf}).
        """
        pos = 0
        n = len(buf)
        while pos < n or self._state == _DONE:
            state = self._state
            if state == _DONE:
                break
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                head = bytes(buf[pos:end]).decode("latin-1").split("\r\n")
                self.status = int(head[0].split(" ", 2)[1])
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    key = name.strip().lower()
                    # Keep repeated headers visible (joined as HTTP allows).
                    value = value.strip()
                    self.headers[key] = (
                        self.headers[key] + ", " + value if key in self.headers else value
                    )
                self.headersAt = now
                pos = end + 4
                self.keepAlive = self.headers.get("connection", "").lower() != "close"
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    self._state = _CHUNK_SIZE
                elif "content-length" in self.headers:
                    self._left = int(self.headers["content-length"])
                    self._state = _LENGTH if self._left else _DONE
                elif self.status in (204, 304) or 100 <= self.status < 200:
                    self._state = _DONE
                else:
                    raise ValueError("response without length (read to close) not supported")
            elif state == _LENGTH:
                take = min(self._left, n - pos)
                self._body(buf, pos, pos + take, now)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DONE
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self._state = _TRAILER
                else:
                    self.chunks += 1
                    self._left = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                take = min(self._left, n - pos)
                self._body(buf, pos, pos + take, now)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if n - pos < 2:
                    break
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                if end == pos:
                    self._state = _DONE
                pos = end + 2
        if self._state == _DONE and self.doneAt is None:
            self.doneAt = now
        return pos


def buildRequest(host: str, port: int, method: str, path: str, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> bytes:
    """
    The bytes of one HTTP/1.1 request (persistent connection).
    """
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if body or method in ("POST", "PUT"):
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """
    A persistent connection to one server; L{exchange} sends a request and reads the whole
    response, reconnecting when the server closed the connection.
    """

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.connects = 0

    def connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self.buf = bytearray()
            self.connects += 1
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, request: bytes) -> Response:
        """
        Write a request; return the L{Response} to feed (see L{readMany}).
        """
        sock = self.connect()
        response = Response(time.perf_counter())
        sock.sendall(request)
        return response

    def exchange(self, request: bytes) -> Response:
        """
        Send C{request} and read its whole response (blocking).
        """
        response = self.send(request)
        sock = self.sock
        assert sock is not None
        while not response.done:
            data = sock.recv(RECV_SIZE)
            now = time.perf_counter()
            if not data:
                self.close()
                raise ConnectionError("server closed the connection mid-response")
            self.buf += data
            used = response.feed(self.buf, now)
            del self.buf[:used]
        if not response.keepAlive:
            self.close()
        return response


def readMany(pairs: list[tuple[Connection, Response]], timeout: float,
             batchDelay: float = 0.0) -> None:
    """
    Read several responses at once, one thread, until all are done.

    @param batchDelay: when not 0, sleep this long after every round of reads, so that
        data piles up in the socket buffers and each C{recv} returns many chunks: the
        client then uses a small fraction of a core instead of waking once per token
        (for throughput runs, where arrival times of single chunks do not matter).

    @raise TimeoutError: when C{timeout} seconds pass first.
    """
    selector = selectors.DefaultSelector()
    pending = 0
    try:
        for conn, response in pairs:
            assert conn.sock is not None
            conn.sock.setblocking(False)
            selector.register(conn.sock, selectors.EVENT_READ, (conn, response))
            pending += 1
        deadline = time.perf_counter() + timeout
        while pending:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{pending} responses not complete after {timeout:g}s")
            for key, _ in selector.select(left):
                conn, response = key.data
                data = conn.sock.recv(RECV_SIZE)  # type: ignore[union-attr]
                now = time.perf_counter()
                if not data:
                    raise ConnectionError("server closed the connection mid-response")
                conn.buf += data
                used = response.feed(conn.buf, now)
                del conn.buf[:used]
                if response.done:
                    selector.unregister(key.fileobj)
                    pending -= 1
            if batchDelay and pending:
                time.sleep(batchDelay)
    finally:
        selector.close()
        for conn, _ in pairs:
            if conn.sock is not None:
                conn.sock.setblocking(True)
                conn.sock.settimeout(conn.timeout)
