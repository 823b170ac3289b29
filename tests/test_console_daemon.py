"""
The console against the real daemon side of the control socket: L{ConsoleController}s
connected over C{iosim} to L{ollamamq.control.server}'s protocol on the real scheduler,
pool and control actions (L{tests.controlfixture}), on one C{task.Clock}.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from urwid.testing import render_text

from ollamamq.console import app
from ollamamq.console.widgets import ConsoleView
from tests.test_console_app import DaemonEndpoint

try:
    from ollamamq.control.server import ControlFactory
    from tests.controlfixture import ControlFixture
except ImportError:
    skip = "ollamamq.control.server (the daemon's control socket) is missing"

SIZE = (80, 24)


class Console:
    """
    One attached console: its view, controller and connection.
    """

    def __init__(self, test: SynchronousTestCase, fixture: ControlFixture) -> None:
        factory = ControlFactory(fixture.actions, fixture.hub)
        self.endpoint = DaemonEndpoint(makeServer=lambda: factory.buildProtocol(None))
        self.view = ConsoleView(lambda action: None, utf8=True, clock=fixture.clock.seconds)
        self.controller = app.ConsoleController(self.view, self.endpoint, fixture.clock,
                                                "control.sock", jitter=lambda: 0.0)
        test.addCleanup(self.controller.stop)

    def screen(self) -> str:
        """
        The console's screen as text.
        """
        return "\n".join(render_text(self.view, SIZE))

    def status(self) -> str:
        """
        The status line.
        """
        return render_text(self.view, SIZE)[-1].strip()

    def press(self, *keys: str) -> None:
        """
        Keys, as typed.
        """
        for key in keys:
            self.view.keypress(SIZE, key)


class ConsoleDaemonTests(SynchronousTestCase):
    """
    Two consoles attached to one daemon.
    """

    def setUp(self) -> None:
        """
        Build the pieces the tests share.
        """
        self.fixture = ControlFixture()
        self.clock = self.fixture.clock
        self.one = Console(self, self.fixture)
        self.two = Console(self, self.fixture)
        for console in (self.one, self.two):
            console.controller.start()
        self.settle()

    def settle(self, seconds: float = 1.0) -> None:
        """
        Move bytes on both connections and let time pass, in small steps.
        """
        for _ in range(int(seconds / 0.05)):
            for console in (self.one, self.two):
                for pump in console.endpoint.pumps:
                    pump.flush()
            self.clock.advance(0.05)
        for console in (self.one, self.two):
            for pump in console.endpoint.pumps:
                pump.flush()

    def userPriority(self, user: str) -> Any:
        """
        The user's priority as the scheduler has it.
        """
        return {u["id"]: u for u in self.fixture.scheduler.snapshot()}[user]["priority"]

    def test_attachShowsDaemonState(self) -> None:
        """
        Both consoles show the daemon's version, its backend, and the queued requests
        in order.
        """
        self.fixture.enqueue("alice", requestId="a1")
        self.fixture.enqueue("bob", requestId="b1")
        self.fixture.enqueue("bob", requestId="b2")
        self.settle()
        for console in (self.one, self.two):
            text = console.screen()
            self.assertRegex(text, r"ollamamq \S+ up \d+s")
            self.assertRegex(text, r"● gpu1 +online +ollama 1/1")
            self.assertRegex(text, r"1 bob +m:latest")
            self.assertRegex(text, r"2 bob +m:latest")
            self.assertRegex(text, r"▶ +alice|▶ alice")
            self.assertIn("bob queued m:latest", text)

    def test_changeSeenByBoth(self) -> None:
        """
        p in one console makes the user VIP on the daemon, and the other console shows
        it from the pushed event; the same the other way round for a drain.
        """
        self.fixture.enqueue("alice", requestId="a1")
        self.fixture.enqueue("bob", requestId="b1")
        self.settle()
        # Users panel: alice is first; move to bob.
        self.one.press("j", "p")
        self.settle()
        self.assertEqual(self.userPriority("bob"), "vip")
        self.assertIn("bob: priority vip", self.one.status())
        self.assertRegex(self.two.screen(), r"◆. +bob +vip")
        self.two.press("h", "d")
        self.settle()
        self.assertTrue(self.fixture.pool.backends[0].draining)
        self.assertRegex(self.one.screen(), r"◌ gpu1 +draining")
        self.assertIn("gpu1: draining", self.two.status())

    def test_blockAndCancel(self) -> None:
        """
        x blocks the selected user (its queued request is refused at once); c then y
        cancels a queued request; both consoles see the queue change.
        """
        self.fixture.enqueue("alice", requestId="a1")
        queuedBob = self.fixture.enqueue("bob", requestId="b1", peer="10.0.0.9")
        queuedCarol = self.fixture.enqueue("carol", requestId="c1")
        self.settle()
        self.one.press("tab", "c", "y")  # the Queue panel: b1 goes next
        self.settle()
        self.assertEqual(len(queuedBob.outcome), 1)
        self.assertIn("request b1 cancelled", self.one.status())
        self.assertNotRegex(self.two.screen(), r"\d bob +m:latest")
        self.two.press("j", "j", "x")  # Users: alice, bob, carol
        self.settle()
        self.assertEqual(len(queuedCarol.outcome), 1)
        self.assertIn("carol: priority normal, weight 1, blocked", self.two.status())
        self.assertIn("✖ user carol", self.one.screen())

    def test_daemonErrorShown(self) -> None:
        """
        An action the daemon refuses shows its message; the console stays attached.
        """
        self.one.press("tab", "tab", "u")  # Blocked panel, empty
        self.assertIn("nothing is blocked", self.one.status())
        self.one.controller.perform(app.Action("cancel", {"request": "nope"}, "cancel nope"))
        self.settle()
        self.assertRegex(self.one.status(), r"cancel nope failed: .*nope")
        self.assertIsNotNone(self.one.controller.protocol)
