"""
Tests for L{ollamamq.logs} and C{--log-format}: JSON lines, one per event, with the access
line's fields as keys.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.logs import jsonLineObserver, jsonObserverFactory
from ollamamq.requestlog import logAccess
from ollamamq.tap import Options
from tests.test_requestlog import record


class JSONLinesTests(SynchronousTestCase):
    """
    L{jsonLineObserver}.
    """

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.publisher = LogPublisher(jsonLineObserver(self.out))

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def test_plainEvent(self) -> None:
        """
        An event is one line with time, level, namespace and the formatted message.
        """
        Logger(namespace="ollamamq.test", observer=self.publisher).warn(
            "backend {name} is offline", name="gpu1")
        [line] = self.lines()
        self.assertEqual((line["level"], line["namespace"], line["message"]),
                         ("warn", "ollamamq.test", "backend gpu1 is offline"))
        self.assertTrue(line["time"].endswith("+00:00"))

    def test_accessLine(self) -> None:
        """
        The access line's fields are keys of their own.
        """
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.publisher)
        self.addCleanup(globalLogPublisher.removeObserver, self.publisher)
        logAccess(record(cancelled=True, promptTokens=None, completionTokens=None))
        [line] = [entry for entry in self.lines() if entry["namespace"] == "ollamamq.access"]
        self.assertEqual((line["user"], line["status"], line["cancelled"],
                          line["prompt_tokens"], line["queue_wait"]),
                         ("alice", 200, True, None, 0.5))
        self.assertIn("tokens=unknown", line["message"])
        self.assertEqual(line["arrived"], 1_000_000.0)
        self.assertTrue(line["time"].endswith("+00:00"))

    def test_failure(self) -> None:
        """
        A logged failure carries its traceback, still on one line.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            Logger(observer=self.publisher).failure("it broke")
        [line] = self.lines()
        self.assertIn("ZeroDivisionError", line["traceback"])
        self.assertEqual(self.out.getvalue().count("\n"), 1)


class OptionTests(SynchronousTestCase):
    """
    C{--log-format}.
    """

    def test_jsonSetsTwistdLogger(self) -> None:
        """
        With C{--log-format json}, twistd's own C{logger} option is set to the JSON
        observer factory (twistd starts logging after the plugin's options are parsed).
        """
        options = Options()
        options.environ = {}
        options.parent = {}
        options.parseOptions(["--log-format", "json"])
        self.assertEqual(options.parent["logger"], "ollamamq.logs.jsonObserverFactory")
        from twisted.python.reflect import namedAny

        self.assertIs(namedAny(options.parent["logger"]), jsonObserverFactory)
        self.assertEqual(options.config.logFormat, "json")

    def test_textLeavesTwistdAlone(self) -> None:
        """
        The default keeps twistd's text log.
        """
        options = Options()
        options.environ = {}
        options.parent = {}
        options.parseOptions([])
        self.assertEqual(options.parent, {})

    def test_unknownFormat(self) -> None:
        """
        Anything else is a usage error naming the choices.
        """
        options = Options()
        options.environ = {}
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--log-format", "xml"])
        self.assertIn("text, json", str(e))
