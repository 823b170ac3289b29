"""
Tests for L{ollamamq.usagecli}: C{ollamamq-usage} as a table and as CSV, from a state file
and from a daemon.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ollamamq.requestlog import insertRows
from ollamamq.store import migrate
from ollamamq.usagecli import main
from tests.test_requestlog import record


def stateFile(test: SynchronousTestCase) -> str:
    """
    A state file with a request log of three requests.
    """
    path = test.mktemp()
    db = sqlite3.connect(path)
    migrate(db, path)
    insertRows(db.cursor(), [
        record(user="alice", promptTokens=10, completionTokens=20).row(),
        record(user="alice", promptTokens=1, completionTokens=2, model="qwen").row(),
        record(user="bob", promptTokens=None, completionTokens=None).row(),
    ])
    db.commit()
    db.close()
    return path


def run(argv: list[str], environ: dict | None = None) -> str:
    out = io.StringIO()
    main(argv, out, environ or {})
    return out.getvalue()


class StateFileTests(SynchronousTestCase):
    """
    Reading the state file directly.
    """

    def test_table(self) -> None:
        """
        One aligned line per user, largest first, and a total line.
        """
        lines = run(["--state", stateFile(self)]).splitlines()
        self.assertEqual(lines[0].split()[:4], ["user", "requests", "prompt_tokens",
                                                "completion_tokens"])
        self.assertEqual(lines[1].split()[:5], ["alice", "2", "11", "22", "0"])
        self.assertEqual(lines[2].split()[:5], ["bob", "1", "0", "0", "1"])
        self.assertEqual(lines[-1].split()[:5], ["total", "3", "11", "22", "1"])
        self.assertEqual(len({len(line) for line in lines[:3]}), 1, "aligned columns")

    def test_csv(self) -> None:
        """
        C{--csv} with C{--group model} and a filter.
        """
        text = run(["--state", stateFile(self), "--csv", "--group", "model",
                    "--user", "alice"])
        rows = list(csv.DictReader(io.StringIO(text)))
        self.assertEqual({r["model"]: r["prompt_tokens"] for r in rows},
                         {"llama3:latest": "10", "qwen": "1"})

    def test_missingFile(self) -> None:
        """
        A state file that is not there: a message, no traceback.
        """
        e = self.assertRaises(SystemExit, run, ["--state", self.mktemp()])
        self.assertIn("cannot read", str(e))

    def test_badGroup(self) -> None:
        """
        An unknown group is a usage error.
        """
        e = self.assertRaises(SystemExit, run, ["--group", "planet"])
        self.assertIn("--group", str(e))


class DaemonTests(SynchronousTestCase):
    """
    Asking a daemon over HTTP (here a stand-in answering as C{/proxy/usage} does).
    """

    def serve(self, code: int, answer: Any) -> tuple[str, list]:
        seen: list = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("X-Admin-Key")))
                body = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = HTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    def test_asksDaemon(self) -> None:
        """
        The filters go in the query, the admin key from the environment in a header.
        """
        row = {"user": "alice", "requests": 1, "prompt_tokens": 2, "completion_tokens": 3,
               "unknown": 0, "cancelled": 0, "errors": 0, "bytes": 4, "duration": 1.5,
               "queue_wait": 0.25}
        url, seen = self.serve(200, {"group": "user", "totals": [row]})
        text = run(["--url", url, "--since", "2026-01-01"], {"OLLAMAMQ_ADMIN_KEY": "k"})
        self.assertEqual(seen, [("/proxy/usage?since=2026-01-01&group=user", "k")])
        self.assertEqual(text.splitlines()[1].split(),
                         ["alice", "1", "2", "3", "0", "0", "0", "4", "1.5", "0.2"])

    def test_refused(self) -> None:
        """
        The daemon's error message is shown.
        """
        url, _ = self.serve(403, {"error": "this route needs the admin key"})
        e = self.assertRaises(SystemExit, run, ["--url", url])
        self.assertEqual(str(e), "ollamamq-usage: 403: this route needs the admin key")
