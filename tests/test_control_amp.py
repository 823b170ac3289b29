"""
Tests for L{ollamamq.control.amp}: the command definitions shared by daemon and console.

The commands' behaviour against a daemon is tested in L{tests.test_control_server}.
"""

from __future__ import annotations

from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.control import amp as commands


class _Locator(amp.CommandLocator):
    """
    Answers L{commands.SetUser} by echoing, and refuses an empty user id the way the
    daemon does, to exercise the encoding and the error mapping.
    """

    @commands.SetUser.responder
    def setUser(self, user, priority=None, weight=None, maxQueued=None, blocked=None):
        """
        Echo the arguments as a user row, or raise L{commands.InvalidValue}.
        """
        if not user:
            raise commands.InvalidValue("user: must not be empty")
        return {
            "id": user,
            "priority": priority or "normal",
            "weight": weight or 1.0,
            "maxQueued": maxQueued,
            "blocked": bool(blocked),
            "queued": 0,
            "active": 0,
            "served": 0,
            "runtime": [k for k, v in [("priority", priority), ("weight", weight)] if v],
        }


class CommandShapeTests(SynchronousTestCase):
    """
    Every command is well formed for Python 3 AMP and the error codes are distinct.
    """

    def test_namesAreBytes(self) -> None:
        """
        Argument and response names and error codes are bytes (AMP refuses text names
        at definition time; this guards rows built from shared lists).
        """
        for command in commands.COMMANDS + (commands.Event,):
            for name, _ in list(command.arguments) + list(command.response):
                self.assertIsInstance(name, bytes, command)
            for code in command.errors.values():
                self.assertIsInstance(code, bytes, command)

    def test_codesDistinct(self) -> None:
        """
        Each error class has its own code, so the client gets the same class back.
        """
        codes = list(commands.ERRORS.values())
        self.assertEqual(len(codes), len(set(codes)))

    def test_errorMessage(self) -> None:
        """
        C{str()} of an error is its message, which is what AMP sends as the description.
        """
        self.assertEqual(str(commands.UnknownUser("no user 'x'")), "no user 'x'")
        self.assertEqual(str(commands.InternalError()), "InternalError")


class RoundTripTests(SynchronousTestCase):
    """
    Values and errors cross a real AMP connection intact.
    """

    def setUp(self) -> None:
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: amp.AMP(locator=_Locator()), amp.AMP
        )

    def test_optionalArguments(self) -> None:
        """
        Optional arguments left out arrive as L{None}; optional responses may be L{None}.
        """
        d = self.client.callRemote(commands.SetUser, user="alice", priority="vip")
        self.pump.flush()
        row = self.successResultOf(d)
        self.assertEqual(row["id"], "alice")
        self.assertEqual(row["priority"], "vip")
        self.assertIsNone(row["maxQueued"])
        self.assertEqual(row["runtime"], ["priority"])

    def test_mappedError(self) -> None:
        """
        A mapped error reaches the client as the same class with the same message.
        """
        failures: list = []
        d = self.client.callRemote(commands.SetUser, user="")
        d.addErrback(failures.append)
        self.pump.flush()
        [failure] = failures
        failure.trap(commands.InvalidValue)
        self.assertEqual(str(failure.value), "user: must not be empty")
        self.assertFalse(self.client.transport.disconnecting)
