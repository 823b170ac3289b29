"""
Tests for L{ollamamq.console.widgets}: the screen rendered to text from snapshot and event
dicts, and what each key does to the selection or asks of the controller.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from urwid.testing import check_box_sizing, render_runs, render_text

from ollamamq.console import widgets
from ollamamq.console.widgets import Action, ConsoleView

SIZE = (80, 24)


def snapshot(**changes: Any) -> dict:
    """
    A status snapshot shaped like C{/proxy/status} plus the console's additions: two
    backends, three users (one blocked), two queued requests, one blocked address.
    """
    snap = {
        "version": "0.1.0",
        "uptime": 3725,
        "backends": [
            {"name": "gpu1", "url": "http://10.0.0.1:11434", "online": True, "state": "online",
             "kind": "ollama", "slots": 2, "active": 1, "draining": False,
             "models": ["llama3:latest", "qwen2:7b"], "loaded": ["llama3:latest"]},
            {"name": "gpu2", "url": "http://10.0.0.2:8080", "online": False, "state": "offline",
             "kind": "openai", "slots": 1, "active": 0, "draining": False,
             "models": [], "loaded": []},
        ],
        "users": [
            {"id": "alice", "priority": "vip", "weight": 1.0, "blocked": False, "queued": 2,
             "active": 1, "served": 42, "oldest_wait": 12.0},
            {"id": "bob", "priority": "boost", "weight": 2.0, "blocked": False, "queued": 0,
             "active": 0, "served": 1200, "ip": "10.1.2.4"},
            {"id": "ip:10.1.2.3", "priority": "normal", "weight": 1.0, "blocked": True,
             "queued": 0, "active": 0, "served": 0},
        ],
        "queue": [
            {"id": "r1", "position": 1, "user": "alice", "model": "llama3", "waited": 12.0},
            {"id": "r2", "position": 2, "user": "alice", "model": "qwen2:7b", "waited": 3.0},
        ],
        "blocked_ips": ["10.9.9.0/24"],
        "queued": 2,
        "active": 1,
    }
    snap.update(changes)
    return snap


class ViewTestCase(SynchronousTestCase):
    """
    A view on a fixed clock with the sample snapshot; actions are collected.
    """

    def setUp(self) -> None:
        """
        Build the pieces the tests share.
        """
        self.now = 1000.0
        self.actions: list[Action] = []
        self.view = ConsoleView(self.actions.append, utf8=True, clock=lambda: self.now)
        self.view.showConnection(None)
        self.view.showSnapshot(snapshot())

    def screen(self, size: tuple[int, int] = SIZE) -> str:
        """
        The whole screen as text.
        """
        return "\n".join(render_text(self.view, size))

    def press(self, *keys: str) -> list[str]:
        """
        Send keys at 80x24; return those the view did not handle.
        """
        return [k for k in keys if self.view.keypress(SIZE, k) is not None]

    def status(self) -> str:
        """
        The status line's text.
        """
        return render_text(self.view, SIZE)[-1].strip()


class RenderTests(ViewTestCase):
    """
    The panels, header, legend and event strip drawn from data.
    """

    def test_panelsFromSnapshot(self) -> None:
        """
        Every backend, user, queued request and blocked entry appears in its panel with
        its fields.
        """
        text = self.screen()
        self.assertIn("Backends (2)", text)
        self.assertRegex(text, r"● gpu1 +online +ollama 1/2 +http://10\.0\.0\.1:11434 +▸ llama3:latest")
        self.assertRegex(text, r"○ gpu2 +offline +openai 0/1")
        self.assertIn("Users (3)", text)
        self.assertRegex(text, r"◆▶  alice +vip +w1 +q2 +run1 +served 42 .* wait 12s")
        self.assertRegex(text, r"▲○  bob +boost +w2 +q0 +run0 +served 1\.2k")
        self.assertRegex(text, r"✖○  ip:10\.1\.2\.3")
        self.assertIn("Queue (2)", text)
        self.assertRegex(text, r"1 alice +llama3 +12s")
        self.assertRegex(text, r"2 alice +qwen2:7b +3s")
        self.assertIn("Blocked (2)", text)
        self.assertIn("✖ user ip:10.1.2.3", text)
        self.assertIn("✖ ip   10.9.9.0/24", text)

    def test_header(self) -> None:
        """
        The header shows version, uptime, rates, totals and a throughput history.
        """
        self.view.showRates(1.5, 42.0, [0, 1, 2, 4, 8])
        header = render_text(self.view, SIZE)[0]
        self.assertIn("ollamamq 0.1.0 up 1h02m 1.5 req/s 42.0 tok/s queued 2 running 1", header)
        self.assertTrue(header.rstrip().endswith("▁▂▄█"), header)

    def test_unknownTokenRate(self) -> None:
        """
        Without token counts from the daemon the token rate is a dash, not a made-up zero.
        """
        self.view.showRates(0.2, None, [])
        self.assertIn("0.2 req/s - tok/s", render_text(self.view, SIZE)[0])

    def test_attachedInsteadOfUptime(self) -> None:
        """
        A snapshot without the daemon's uptime shows how long the console is attached.
        """
        self.view.showSnapshot(snapshot(uptime=None, attached=65))
        self.assertIn("attached 1m05s", render_text(self.view, SIZE)[0])

    def test_ticksAdvanceWaits(self) -> None:
        """
        Between snapshots, uptime and queue waits keep counting on the view's clock.
        """
        self.now += 10
        self.view.tick()
        text = self.screen()
        self.assertRegex(text, r"1 alice +llama3 +22s")
        self.assertIn("up 1h02m", text)
        self.assertRegex(text, r"alice .* wait 22s")

    def test_legendAndColours(self) -> None:
        """
        The legend names every marker, and markers carry their colour attribute.
        """
        legendLine = render_text(self.view, SIZE)[1]
        for word in ("◆vip", "▲boost", "▶running", "●queued", "○idle", "✖blocked",
                     "●online", "◐suspect", "○offline", "◌draining"):
            self.assertIn(word, legendLine)
        runs = [run for row in render_runs(self.view, SIZE) for run in row]
        self.assertIn(("vip", "◆"), runs)
        self.assertIn(("boost", "▲"), runs)
        self.assertIn(("offline", "○"), runs)
        self.assertIn(("blocked", "✖"), runs)
        names = {entry[0] for entry in widgets.PALETTE}
        for attr in ("vip", "boost", "running", "waiting", "idle", "blocked", "online",
                     "suspect", "offline", "draining", "focus", "status error"):
            self.assertIn(attr, names)

    def test_asciiMarkers(self) -> None:
        """
        On a terminal without UTF-8 the markers and history are plain ASCII.
        """
        view = ConsoleView(self.actions.append, utf8=False, clock=lambda: self.now)
        view.showConnection(None)
        view.showSnapshot(snapshot())
        view.showRates(1, 1, [1, 2])
        text = "\n".join(render_text(view, SIZE))
        self.assertRegex(text, r"V>  alice")
        self.assertTrue(all(ord(c) < 128 for c in text), text)

    def test_suspectAndDraining(self) -> None:
        """
        A draining backend shows as draining whatever its probe says; suspect is shown.
        """
        backends = snapshot()["backends"]
        backends[0]["draining"] = True
        backends[1]["state"] = "suspect"
        self.view.showSnapshot(snapshot(backends=backends))
        text = self.screen()
        self.assertRegex(text, r"◌ gpu1 +draining")
        self.assertRegex(text, r"◐ gpu2 +suspect")

    def test_events(self) -> None:
        """
        Pushed events appear in the strip, newest last, at most three shown and at most
        EVENT_HISTORY kept.
        """
        for i in range(widgets.EVENT_HISTORY + 5):
            self.view.showEvent({"type": "request.queued", "id": f"r{i}", "user": "alice",
                                 "model": "llama3", "queued": i}, when=0)
        self.assertEqual(len(self.view.events), widgets.EVENT_HISTORY)
        lines = render_text(self.view, SIZE)
        strip = [line for line in lines[-4:-1]]
        self.assertIn("alice queued llama3 (54 waiting)", strip[-1])
        self.assertIn("(53 waiting)", strip[-2])

    def test_eventDescriptions(self) -> None:
        """
        Each event the daemon pushes reads as a short sentence.
        """
        cases = [
            ({"type": "request.started", "user": "bob", "model": "m", "backend": "gpu1",
              "waited": 2.5}, "bob started m on gpu1 after 2s"),
            ({"type": "request.finished", "user": "bob", "model": "m", "backend": "gpu1",
              "duration": 65}, "bob finished m on gpu1 in 1m05s"),
            ({"type": "request.cancelled", "user": "bob", "model": "m", "reason": "operator"},
             "bob's m request cancelled (operator)"),
            ({"type": "backend.changed", "name": "gpu1", "state": "online", "draining": True},
             "backend gpu1 draining"),
            ({"type": "backend.changed", "name": "gpu1", "state": "offline",
              "error": "connection refused"}, "backend gpu1 offline: connection refused"),
            ({"type": "backend.changed", "name": "gpu1", "removed": True}, "backend gpu1 removed"),
            ({"type": "policy.changed", "user": {"id": "bob", "priority": "vip", "weight": 2.0,
                                                  "blocked": False}}, "bob: vip, weight 2"),
            ({"type": "policy.changed", "user": {"id": "bob", "priority": "normal",
                                                  "weight": 1.0, "blocked": True}},
             "bob: normal, weight 1, blocked"),
            ({"type": "policy.changed", "address": "10.0.0.0/8", "blocked": True},
             "address 10.0.0.0/8 blocked"),
            ({"type": "config.reloaded", "changes": ["a", "b"]}, "config reloaded: a; b"),
            ({"type": "events.dropped", "count": 7}, "7 events missed; resynchronising"),
            ({"type": "something.new", "x": 1}, "something.new x=1"),
        ]
        for event, text in cases:
            self.assertEqual(widgets.describeEvent(event), text)

    def test_sizes(self) -> None:
        """
        The screen renders at 80x24, larger, and even cramped sizes, with every overlay.
        """
        check_box_sizing(self.view, cols=80, rows=24)
        check_box_sizing(self.view, cols=120, rows=40)
        self.press("?")
        check_box_sizing(self.view, cols=80, rows=24)
        check_box_sizing(self.view, cols=40, rows=10)

    def test_resizeShowsMore(self) -> None:
        """
        A bigger window shows what 80 columns clip (the user's BLOCKED tag) and more rows.
        """
        narrow = self.screen((80, 24))
        wide = self.screen((120, 40))
        self.assertNotIn("BLOCKED", narrow)
        self.assertIn("BLOCKED", wide)
        self.assertEqual(len(wide.splitlines()), 40)

    def test_disconnectedBanner(self) -> None:
        """
        A connection problem replaces the legend with a banner until it is solved.
        """
        self.view.showConnection("No daemon: x.sock does not exist. Retrying in 1.0s.")
        self.assertIn("No daemon: x.sock does not exist", render_text(self.view, SIZE)[1])
        runs = render_runs(self.view, SIZE)[1]
        self.assertEqual(runs[0][0], "disconnected")
        self.view.showConnection(None)
        self.assertIn("◆vip", render_text(self.view, SIZE)[1])

    def test_longBannerWraps(self) -> None:
        """
        A problem longer than the screen is wide wraps instead of losing its advice.
        """
        path = "/run/ollamamq/" + "x" * 40 + "/control.sock"
        self.view.showConnection(f"Permission denied on {path}: run the console as the daemon's "
                                 "user or root.")
        lines = render_text(self.view, SIZE)
        self.assertEqual(len(lines), 24)
        self.assertIn("Permission denied on", lines[1])
        self.assertIn(f"Permission denied on {path}: run the console as the daemon's user or root.",
                      " ".join(" ".join(lines[1:5]).split()))
        self.view.showConnection(None)
        self.assertIn("Backends", render_text(self.view, SIZE)[2])

    def test_expandModels(self) -> None:
        """
        Space or Enter on a backend lists all its models (loaded ones starred); again
        collapses.
        """
        self.press("h")
        self.assertEqual(self.view.current, "backends")
        self.press(" ")
        text = self.screen()
        self.assertIn("▾ llama3:latest", text)
        self.assertIn("* llama3:latest", text)
        self.assertIn("  qwen2:7b", text)
        self.press("enter")
        text = self.screen()
        self.assertIn("▸ llama3:latest", text)
        self.assertNotIn("* llama3:latest", text)


class NavigationTests(ViewTestCase):
    """
    Moving the selection and switching panels.
    """

    def test_moveSelection(self) -> None:
        """
        j/k and the arrows move within the panel, clamped at the ends.
        """
        panel = self.view.panels["users"]
        self.assertEqual(panel.selected, "alice")
        self.press("j")
        self.assertEqual(panel.selected, "bob")
        self.press("down", "down", "down")
        self.assertEqual(panel.selected, "ip:10.1.2.3")
        self.press("k", "up")
        self.assertEqual(panel.selected, "alice")
        self.press("up")
        self.assertEqual(panel.selected, "alice")

    def test_switchPanels(self) -> None:
        """
        Tab and l go forward through Backends, Users, Queue, Blocked (wrapping); h and
        Shift-Tab go back. Only the current panel's title is highlighted.
        """
        seen = [self.view.current]
        for _ in range(4):
            self.press("tab")
            seen.append(self.view.current)
        self.assertEqual(seen, ["users", "queue", "blocked", "backends", "users"])
        self.press("l")
        self.assertEqual(self.view.current, "queue")
        self.press("h", "shift tab")
        self.assertEqual(self.view.current, "backends")
        active = [p.name for p in self.view.panels.values() if p.active]
        self.assertEqual(active, ["backends"])

    def test_selectionSurvivesUpdates(self) -> None:
        """
        The selected user stays selected when a snapshot reorders the list, and a
        vanished one gives way to the row now at its position.
        """
        self.press("j")
        users = snapshot()["users"]
        self.view.showSnapshot(snapshot(users=[users[1], users[0], users[2]]))
        self.assertEqual(self.view.panels["users"].selected, "bob")
        # bob was first: the row now first takes the selection.
        self.view.showSnapshot(snapshot(users=[users[0], users[2]]))
        self.assertEqual(self.view.panels["users"].selected, "alice")

    def test_unhandledKeys(self) -> None:
        """
        Keys with no meaning are passed on (so MainLoop's unhandled_input sees them).
        """
        self.assertEqual(self.press("z", "f5"), ["z", "f5"])
        self.assertEqual(self.actions, [])

    def test_help(self) -> None:
        """
        ? opens the key reference over the screen; any key closes it without acting.
        """
        self.press("?")
        text = self.screen()
        self.assertIn("ollamamq console help", text)
        self.assertIn("toggle VIP for the selected user", text)
        self.press("q")
        self.assertNotIn("ollamamq console help", self.screen())
        self.assertEqual(self.actions, [])

    def test_filter(self) -> None:
        """
        / filters the users (and their queued requests) by name as it is typed; Enter
        keeps the filter, Esc clears it.
        """
        self.press("/", "b", "o")
        text = self.screen()
        self.assertIn("filter users: bo", text)
        self.assertIn("Users (1)", text)
        self.assertIn("Queue (0)", text)
        self.press("enter")
        self.assertIn("Filter: bo", self.status())
        self.assertIn("[filter: bo]", self.screen())
        self.assertEqual(self.view.panels["users"].selected, "bob")
        # Keys act again once the prompt is closed.
        self.press("p")
        self.assertEqual(self.actions[-1].args, {"user": "bob", "priority": "vip"})
        self.press("/", "esc")
        self.assertIn("Users (3)", self.screen())
        self.assertIn("Filter cleared.", self.status())


class ActionTests(ViewTestCase):
    """
    Keys that ask the controller for an action, and the errors shown when they cannot.
    """

    def test_vipToggle(self) -> None:
        """
        p makes a normal or boosted user VIP, and a VIP user normal.
        """
        self.press("p")
        self.press("j", "p")
        self.assertEqual([a.args for a in self.actions], [
            {"user": "alice", "priority": "normal"},
            {"user": "bob", "priority": "vip"},
        ])
        self.assertEqual({a.name for a in self.actions}, {"priority"})
        self.assertIn("bob: priority vip...", self.status())

    def test_boostToggle(self) -> None:
        """
        b boosts a normal or VIP user and makes a boosted user normal.
        """
        self.press("b", "j", "b")
        self.assertEqual([a.args["priority"] for a in self.actions], ["boost", "normal"])

    def test_weight(self) -> None:
        """
        + and - step the weight by one, halving and doubling below one.
        """
        self.press("j", "+", "-")
        self.press("k", "-")
        self.assertEqual([(a.args["user"], a.args["weight"]) for a in self.actions],
                         [("bob", 3.0), ("bob", 1.0), ("alice", 0.5)])

    def test_blockUserAndIP(self) -> None:
        """
        x blocks the selected user; X blocks the address it was last seen from (its
        C{ip} field, or the address of an C{ip:} identity).
        """
        self.press("j", "x", "X", "j", "X")
        self.assertEqual([(a.name, a.args) for a in self.actions], [
            ("block", {"user": "bob"}),
            ("blockIP", {"ip": "10.1.2.4"}),
            ("blockIP", {"ip": "10.1.2.3"}),
        ])

    def test_blockIPUnknown(self) -> None:
        """
        X on a user with no known address says so and sends nothing.
        """
        self.press("X")
        self.assertEqual(self.actions, [])
        self.assertIn("no IP address is known for alice", self.status())
        self.assertEqual(render_runs(self.view, SIZE)[-1][0][0], "status error")

    def test_unblock(self) -> None:
        """
        u unblocks the selected user, or in the Blocked panel the selected user or
        address.
        """
        self.press("j", "j", "u")
        self.press("tab", "tab", "u", "j", "u")
        self.assertEqual([(a.name, a.args) for a in self.actions], [
            ("unblock", {"user": "ip:10.1.2.3"}),
            ("unblock", {"user": "ip:10.1.2.3"}),
            ("unblockIP", {"ip": "10.9.9.0/24"}),
        ])

    def test_unblockNothing(self) -> None:
        """
        u in an empty Blocked panel is an error in the status line.
        """
        self.view.showSnapshot(snapshot(users=[], blocked_ips=[]))
        self.press("tab", "tab", "u")
        self.assertEqual(self.actions, [])
        self.assertIn("nothing is blocked", self.status())

    def test_drain(self) -> None:
        """
        d drains an active backend and undrains a draining one; elsewhere it explains.
        """
        self.press("d")
        self.assertIn("select a backend", self.status())
        backends = snapshot()["backends"]
        backends[1]["draining"] = True
        self.view.showSnapshot(snapshot(backends=backends))
        self.press("h", "d", "j", "d")
        self.assertEqual([(a.name, a.args) for a in self.actions], [
            ("drain", {"backend": "gpu1"}),
            ("undrain", {"backend": "gpu2"}),
        ])

    def test_cancelConfirmed(self) -> None:
        """
        c on a queued request asks first; y sends the cancel.
        """
        self.press("tab", "j", "c")
        self.assertEqual(self.actions, [])
        self.assertIn("Cancel request r2 of alice (qwen2:7b)? y/n", self.screen())
        self.press("y")
        self.assertEqual([(a.name, a.args) for a in self.actions], [("cancel", {"request": "r2"})])
        self.assertIn("cancel request r2 of alice...", self.status())

    def test_cancelDeclined(self) -> None:
        """
        Any other key than y at the confirmation sends nothing (and is not acted on).
        """
        self.press("tab", "c", "q")
        self.assertEqual(self.actions, [])
        self.assertIn("Not cancelled.", self.status())

    def test_cancelOutsideQueue(self) -> None:
        """
        c outside the Queue panel explains where to use it.
        """
        self.press("c")
        self.assertEqual(self.actions, [])
        self.assertIn("select a queued request in the Queue panel", self.status())

    def test_queueActsOnUser(self) -> None:
        """
        In the Queue panel, p acts on the selected request's user.
        """
        self.press("tab", "p")
        self.assertEqual(self.actions[0].args, {"user": "alice", "priority": "normal"})

    def test_userKeyWithoutUser(self) -> None:
        """
        User keys in the Backends panel explain instead of guessing.
        """
        self.press("h", "p", "x", "+")
        self.assertEqual(self.actions, [])
        self.assertIn("+: select a user in the Users or Queue panel first.", self.status())

    def test_reloadAndQuit(self) -> None:
        """
        r asks for a reload; q and Esc ask to quit.
        """
        self.press("r", "q", "esc")
        self.assertEqual([a.name for a in self.actions], ["reload", "quit", "quit"])
