"""
End-to-end test of the console in a real terminal: the simulator, the daemon and
C{ollamamq-console} as real processes on 127.0.0.1, the console inside tmux at 80x24.

The screen is read with C{tmux capture-pane} and polled for the expected text until a
deadline (never a fixed sleep); keys go in with C{tmux send-keys}. Each test uses its own
tmux server (C{-L}), killed in cleanup with everything it ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.harness import PROJECT_ROOT, ProcessTestCase

TMUX = shutil.which("tmux")

# How long to wait for the screen (or the daemon) to show an expected state.
DEADLINE = 20.0


class Terminal:
    """
    One program running in a detached tmux session on a private tmux server.
    """

    def __init__(self, name: str, command: list[str], cols: int = 80, rows: int = 24) -> None:
        self.name = name
        self.server = f"ollamamq-test-{os.getpid()}-{name}"
        env = {
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color",
            "PYTHONPATH": PROJECT_ROOT, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        line = " ".join(f"{k}={_quote(v)}" for k, v in env.items())
        line = f"env -i {line} " + " ".join(_quote(a) for a in command)
        self.tmux("new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), line)
        # kill-server leaves its socket file behind: remembered, removed in close().
        self.socket = self.tmux("display-message", "-p", "-t", name, "#{socket_path}").strip()
        # Keep the pane after the program exits, so a crash can be read.
        self.tmux("set-option", "-t", name, "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        """
        Run a tmux command on this terminal's server; return its output.
        """
        assert TMUX is not None
        done = subprocess.run([TMUX, "-L", self.server, *args], capture_output=True, text=True,
                              timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def screen(self) -> str:
        """
        The screen's text now.
        """
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def press(self, *keys: str) -> None:
        """
        Type keys (tmux key names: C{Tab}, C{Escape}, or plain characters).
        """
        self.tmux("send-keys", "-t", self.name, *keys)

    async def waitFor(self, pattern: str, deadline: float = DEADLINE) -> str:
        """
        Poll the screen until C{pattern} (a regular expression) is on it; return the
        screen. Fails with the last screen when the deadline passes.
        """
        compiled = re.compile(pattern)
        return await _poll(lambda: (lambda s: s if compiled.search(s) else None)(self.screen()),
                           deadline, lambda: f"{pattern!r} not on screen:\n{self.screen()}")

    def close(self) -> None:
        """
        Kill the tmux server and the program in it, and remove the server's socket.
        """
        try:
            self.tmux("kill-server")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if self.socket and os.path.exists(self.socket):
            os.unlink(self.socket)


def _quote(value: str) -> str:
    """
    C{value} quoted for the shell tmux runs the command with.
    """
    import shlex

    return shlex.quote(value)


async def _poll(check: Callable[[], Any], deadline: float, describe: Callable[[], str]) -> Any:
    """
    Call C{check} every 0.1s until it returns something truthy, for at most C{deadline}
    seconds.
    """
    end = reactor.seconds() + deadline
    while True:
        result = check()
        if result:
            return result
        if reactor.seconds() > end:
            raise AssertionError(describe())
        await deferLater(reactor, 0.1, lambda: None)


class _TerminalTestCase(ProcessTestCase):
    """
    Skips without tmux; gives each test a short socket path.
    """

    def setUp(self) -> None:
        """
        Skip without tmux (C{.ci/run} installs it).
        """
        if TMUX is None:
            raise self.skipTest("tmux is not installed (Debian package tmux; .ci/run installs it)")
        super().setUp()

    def socketPath(self) -> str:
        """
        A control socket path in a new private directory under the system's temporary
        directory: trial's own directory is too deep for a UNIX socket's 107 bytes.
        """
        import tempfile

        directory = tempfile.mkdtemp(prefix="omq-")
        self.addCleanup(shutil.rmtree, directory, True)
        return os.path.join(directory, "control.sock")


class ConsoleInTerminalTests(_TerminalTestCase):
    """
    The console attached to a real daemon, in a real terminal.
    """

    timeout = 120

    def setUp(self) -> None:
        """
        Skip while this tree has no daemon side of the control socket.
        """
        try:
            import ollamamq.control.server  # noqa: F401
        except ImportError:
            raise self.skipTest("ollamamq.control.server (the daemon's control socket) is missing")
        super().setUp()

    def console(self, name: str, control: str) -> Terminal:
        """
        Start C{python -m ollamamq.console --control PATH} in an 80x24 terminal.
        """
        terminal = Terminal(name, [sys.executable, "-m", "ollamamq.console", "--control", control])
        self.addCleanup(terminal.close)
        return terminal

    async def status(self, url: str) -> dict:
        """
        The daemon's C{/proxy/status}.
        """
        response = await self.http.get(url + "/proxy/status")
        return json.loads(await treq.content(response))

    async def waitForStatus(self, url: str, check: Callable[[dict], bool], what: str) -> dict:
        """
        Poll C{/proxy/status} until C{check} holds.
        """
        last: dict = {}
        end = reactor.seconds() + DEADLINE
        while True:
            last = await self.status(url)
            if check(last):
                return last
            if reactor.seconds() > end:
                raise AssertionError(f"{what}: not in /proxy/status {json.dumps(last)}")
            await deferLater(reactor, 0.1, lambda: None)

    async def startDaemon(self, simURL: str, control: str) -> tuple[str, Any]:
        """
        Start the daemon on the given control socket, with the simulator as backend.
        """
        return await self.startProxy("--backend", simURL, "--control", control, backends=1)

    async def request(self, url: str, user: str) -> None:
        """
        One short chat request as C{user}, read to the end.
        """
        body = json.dumps({"model": "llama3.2", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        response = await self.http.post(url + "/api/chat", body, headers={"X-User-ID": [user]})
        await treq.content(response)
        self.assertEqual(response.code, 200)

    async def test_watchAndSteer(self) -> None:
        """
        The console shows the backend and the users who sent requests; p makes the
        selected user VIP and d drains the backend, both seen in /proxy/status; a second
        console sees the VIP and boosts another user, which the first sees; after the
        daemon restarts the console says so and attaches again by itself.
        """
        simURL, sim = await self.startSimulator("--models", "llama3.2", "--tps", "200",
                                                "--tokens", "5", "--name", "sim-a")
        control = self.socketPath()
        url, proxy = await self.startDaemon(simURL, control)
        terminal = self.console("one", control)
        other = self.console("two", control)
        screen = await terminal.waitFor(r"Attached to ")
        await other.waitFor(r"Attached to ")
        await terminal.waitFor(r"online +ollama")
        for user in ("alice", "bob"):
            await self.request(url, user)
        # In the Users panel (not just in the event strip).
        await terminal.waitFor(r"Users \(2\)(.|\n)*alice +normal(.|\n)*bob +normal")
        await other.waitFor(r"Users \(2\)(.|\n)*alice +normal(.|\n)*bob +normal")

        # Users is the first panel with keys; alice (first by id) is selected.
        terminal.press("p")
        await self.waitForStatus(
            url, lambda s: any(u["id"] == "alice" and u["priority"] == "vip" for u in s["users"]),
            "alice VIP")
        await terminal.waitFor(r"alice: priority vip, weight")
        await terminal.waitFor(r"◆. +alice +vip")
        # The second console sees it from the daemon's event, and acts in turn.
        await other.waitFor(r"◆. +alice +vip")
        other.press("j", "b")
        await self.waitForStatus(
            url, lambda s: any(u["id"] == "bob" and u["priority"] == "boost" for u in s["users"]),
            "bob boosted")
        await terminal.waitFor(r"▲. +bob +boost")

        terminal.press("h", "d")
        await self.waitForStatus(url, lambda s: s["backends"][0]["draining"], "backend draining")
        await terminal.waitFor(r"◌ \S+ +draining")

        # Restart the daemon on the same socket: the console notices and comes back.
        await proxy.stop()
        await terminal.waitFor(r"The daemon went away|No daemon")
        url, proxy = await self.startDaemon(simURL, control)
        await terminal.waitFor(r"Attached to ", deadline=DEADLINE)
        await terminal.waitFor(r"◆vip ▲boost")

        # q leaves the console; the daemon keeps serving.
        terminal.press("q")
        await _poll(lambda: "Pane is dead" in terminal.screen() or _dead(terminal), DEADLINE,
                    lambda: f"console did not quit:\n{terminal.screen()}")
        await self.request(url, "carol")


def _dead(terminal: Terminal) -> bool:
    """
    Whether the terminal's program has exited.
    """
    return terminal.tmux("display-message", "-p", "-t", terminal.name, "#{pane_dead}").strip() == "1"


class ConsoleInTerminalAloneTests(_TerminalTestCase):
    """
    The console program in a real terminal against a control socket served by this test
    (the daemon double of L{tests.test_console_app}): what the terminal shows before a
    daemon exists, and keys typed into tmux reaching the socket.
    """

    timeout = 60

    async def test_waitsForSocketThenAttaches(self) -> None:
        """
        With no socket the console says so and keeps trying; once the socket listens it
        attaches, draws the daemon's state at 80x24, and p sends SetUser.
        """
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.protocol import Factory

        from tests.test_console_app import FakeDaemon, initialState

        control = self.socketPath()
        terminal = Terminal("alone", [sys.executable, "-m", "ollamamq.console", "--control", control])
        self.addCleanup(terminal.close)
        await terminal.waitFor(r"No daemon: .*control\.sock does not exist\. Retrying in")

        state = initialState()
        daemons: list[FakeDaemon] = []

        test = self

        class DaemonFactory(Factory):
            """
            Builds a L{FakeDaemon} per console connection, closed at cleanup.
            """
            def buildProtocol(self, addr: Any) -> FakeDaemon:
                """
                A new daemon end on the shared state.
                """
                daemon = FakeDaemon(state)
                daemons.append(daemon)
                test.addCleanup(closeDaemon, daemon)
                return daemon

        def closeDaemon(daemon: FakeDaemon) -> Any:
            """
            Close one daemon connection and wait until it is gone.
            """
            if daemon.transport is not None and not daemon.lost.called:
                daemon.transport.loseConnection()
            return daemon.lost

        port = await serverFromString(reactor, f"unix:address={control}:mode=600").listen(DaemonFactory())
        self.addCleanup(port.stopListening)
        await terminal.waitFor(r"Attached to ")
        # The state is read just after attaching.
        screen = await terminal.waitFor(r"● gpu1 +online(.|\n)*Users \(2\)")
        self.assertIn("◆vip", screen)
        lines = screen.splitlines()
        self.assertEqual(len(lines), 24)
        self.assertTrue(all(len(line) <= 80 for line in lines))
        terminal.press("p")
        await terminal.waitFor(r"alice: priority vip, weight 1")
        self.assertEqual(state["users"]["alice"]["priority"], "vip")
        for daemon in daemons:
            if daemon.transport is not None:
                daemon.transport.loseConnection()
        await terminal.waitFor(r"The daemon went away|No daemon")
        terminal.press("q")
        await _poll(lambda: _dead(terminal), DEADLINE,
                    lambda: f"console did not quit:\n{terminal.screen()}")

    async def test_permissionDenied(self) -> None:
        """
        A console whose user may not open the socket (mode 0600, another owner) says so
        and how to fix it. Run as root, the console is started as C{nobody}.
        """
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.protocol import Factory, Protocol

        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0 or setpriv is None:
            raise self.skipTest("needs root and setpriv to run the console as another user")
        probe = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", "import urwid, ollamamq.console.app"],
            capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": PROJECT_ROOT, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        if probe.returncode != 0:
            raise self.skipTest("user nobody cannot read this virtualenv or checkout: "
                                + (probe.stderr.strip().splitlines() or ["?"])[-1])
        control = self.socketPath()
        # Others may enter the directory; the socket itself is the daemon's alone.
        os.chmod(os.path.dirname(control), 0o755)
        port = await serverFromString(reactor, f"unix:address={control}:mode=600").listen(
            Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        terminal = Terminal("denied", [
            setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
            sys.executable, "-m", "ollamamq.console", "--control", control])
        self.addCleanup(terminal.close)
        screen = await terminal.waitFor(r"Permission denied on ")
        await terminal.waitFor(r"or root\.")
        self.assertIn(f"Permission denied on {control}: run the console as the daemon's user or "
                      "root.", " ".join(terminal.screen().split()))
