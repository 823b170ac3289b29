"""
Integration tests of the control plane with real processes (L{tests.harness}): runtime
changes surviving a restart, the control socket's mode and lock, and reloading the config
with SIGHUP while requests stream and wait.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp

from ollamamq.control import amp as commands
from tests.harness import ProcessTestCase, _script, threaded


def _generate(url: str, user: str, model: str, stream: bool) -> list[dict]:
    """
    One C{/api/generate} through the proxy (blocking); the answer's JSON lines.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        body = json.dumps({"model": model, "prompt": "hi", "stream": stream})
        connection.request("POST", "/api/generate", body, {"X-User-ID": user})
        response = connection.getresponse()
        lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
        if response.status != 200:
            raise AssertionError(f"{response.status}: {lines}")
        return lines
    finally:
        connection.close()


class EventClient(amp.AMP):
    """
    A subscriber that lets a test wait for an event (the harness's timeout bounds it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict]] = []
        self._waiters: list[tuple[str, str, Deferred[dict]]] = []

    @commands.Event.responder
    def event(self, name: str, payload: str) -> dict:
        data = json.loads(payload)
        self.events.append((name, data))
        for waiter in list(self._waiters):
            if waiter[0] == name and data.get("user") == waiter[1]:
                self._waiters.remove(waiter)
                waiter[2].callback(data)
        return {}

    def waitFor(self, name: str, user: str) -> Deferred[dict]:
        """
        Fires with the payload of the first event C{name} about C{user}, past or future.
        """
        for seen, data in self.events:
            if seen == name and data.get("user") == user:
                return succeed(data)
        d: Deferred[dict] = Deferred()
        self._waiters.append((name, user, d))
        return d


class ControlTestCase(ProcessTestCase):
    """
    Helpers: a proxy with known control and state paths, an AMP client.
    """

    def paths(self) -> tuple[str, str]:
        """
        A fresh directory's control socket and state file paths.
        """
        workdir = self.mktemp()
        os.makedirs(workdir)
        return os.path.join(workdir, "control.sock"), os.path.join(workdir, "state.db")

    async def connect(self, path: str, protocol: amp.AMP | None = None) -> Any:
        """
        An AMP client (C{protocol}, a plain one by default) on the control socket, closed
        at cleanup.
        """
        client = await connectProtocol(UNIXClientEndpoint(reactor, path),
                                       protocol if protocol is not None else amp.AMP())
        self.addCleanup(client.transport.loseConnection)
        return client

    async def status(self, url: str) -> dict:
        """
        C{/proxy/status}.
        """
        response = await self.http.get(url + "/proxy/status")
        return await treq.json_content(response)


class PersistenceTests(ControlTestCase):
    """
    Runtime changes are kept across SIGTERM and a restart on the same state file; the
    control socket is private and owned by one daemon.
    """

    async def test_survivesRestart(self) -> None:
        """
        A VIP, a weight, an address block and a drain set over the control socket still
        hold after SIGTERM and a restart with the same C{--state}; the socket is 0600,
        removed on exit, and a second daemon on it refuses to start.
        """
        simURL, _ = await self.startSimulator("--models", "llama3.2")
        control, state = self.paths()
        args = ("--backend", simURL, "--control", control, "--state", state)
        url, proxy = await self.startProxy(*args, backends=1)
        self.assertEqual(stat.S_IMODE(os.stat(control).st_mode), 0o600)
        client = await self.connect(control)
        await client.callRemote(commands.SetUser, user="alice", priority="vip")
        await client.callRemote(commands.SetUser, user="team", weight=3.0)
        await client.callRemote(commands.BlockAddress, address="10.9.0.0/16")
        [backend] = (await client.callRemote(commands.Snapshot))["backends"]
        await client.callRemote(commands.DrainBackend, name=backend["name"])

        second = self.spawn("second", self.proxyArgv(*args))
        await second.waitFor(r"belongs to another running ollamamq")
        await second.ended
        self.assertTrue(os.path.exists(control))

        client.transport.loseConnection()
        await proxy.stop()
        self.assertFalse(os.path.exists(control))

        url, proxy = await self.startProxy(*args)
        client = await self.connect(control)
        users = {u["id"]: u for u in (await client.callRemote(commands.ListUsers))["users"]}
        self.assertEqual((users["alice"]["priority"], users["alice"]["runtime"]),
                         ("vip", ["priority"]))
        self.assertEqual(users["team"]["weight"], 3.0)
        blocked = await client.callRemote(commands.ListBlocked)
        self.assertEqual([a["address"] for a in blocked["addresses"]], ["10.9.0.0/16"])
        [backend] = (await client.callRemote(commands.Snapshot))["backends"]
        self.assertTrue(backend["draining"])
        status = await self.status(url)
        self.assertEqual(status["blocked_ips"], ["10.9.0.0/16"])
        self.assertTrue(status["backends"][0]["draining"])

    def proxyArgv(self, *args: str) -> list[str]:
        """
        The command line of a proxy with C{args}, as L{startProxy} runs it.
        """
        return _script("twistd") + ["-n", "--pidfile=", "ollamamq", "--listen",
                                    "tcp:0:interface=127.0.0.1", *args]


class ReloadTests(ControlTestCase):
    """
    SIGHUP re-reads the config file.
    """

    def writeConfig(self, path: str, text: str) -> None:
        """
        Replace the config file's content.
        """
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)

    async def test_sighup(self) -> None:
        """
        Adding a backend and a user to the config and sending SIGHUP: the new backend
        serves its model, the user's policy applies, a stream running across the reload
        completes, a queued request stays queued and then runs; a broken config on SIGHUP
        changes nothing.
        """
        simA, _ = await self.startSimulator("--models", "llama3.2", "--tps", "20",
                                            "--tokens", "60", "--slots", "1")
        simB, _ = await self.startSimulator("--models", "qwen2.5", "--tokens", "5")
        control, state = self.paths()
        config = self.mktemp() + ".toml"
        nameA = "gpu-a"
        base = f'[[backends]]\nurl = "{simA}"\nname = "{nameA}"\nslots = 1\n'
        self.writeConfig(config, base)
        url, proxy = await self.startProxy("--config", config, "--control", control,
                                           "--state", state, backends=1)
        client = await self.connect(control, EventClient())
        await client.callRemote(commands.Subscribe, names=["request"])

        streaming = threaded(_generate, url, "xavier", "llama3.2", True)
        await client.waitFor("request.started", "xavier")
        waiting = threaded(_generate, url, "yvonne", "llama3.2", False)
        await client.waitFor("request.queued", "yvonne")

        self.writeConfig(
            config,
            base + f'[[backends]]\nurl = "{simB}"\nname = "gpu-b"\n\n'
            '[users.carol]\npriority = "vip"\nweight = 2\n',
        )
        proxy.transport.signalProcess("HUP")
        await proxy.waitFor(r"Config reloaded: .*backend gpu-b added")
        await proxy.waitFor(r"Backend gpu-b \(\S+\) is online")
        queue = await client.callRemote(commands.ListQueue)
        self.assertEqual([r["user"] for r in queue["requests"]], ["yvonne"])
        self.assertFalse(streaming.called)

        answer = await threaded(_generate, url, "carol", "qwen2.5", False)
        self.assertTrue(answer[-1]["done"])
        users = {u["id"]: u for u in (await self.status(url))["users"]}
        self.assertEqual((users["carol"]["priority"], users["carol"]["weight"]), ("vip", 2))

        lines = await streaming
        self.assertTrue(lines[-1]["done"])
        self.assertGreater(len(lines), 30)
        self.assertTrue((await waiting)[-1]["done"])

        before = await self.status(url)
        self.writeConfig(config, "[[backends]\nurl = oops\n")
        proxy.transport.signalProcess("HUP")
        await proxy.waitFor(r"Reload refused, the old config stays: ")
        after = await self.status(url)
        self.assertEqual([b["name"] for b in after["backends"]],
                         [b["name"] for b in before["backends"]])
        self.assertEqual({u["id"]: u["priority"] for u in after["users"]},
                         {u["id"]: u["priority"] for u in before["users"]})

