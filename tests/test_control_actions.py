"""
Tests for L{ollamamq.control.actions}: config defaults under runtime overrides, what is
saved, restoring at startup, and reloading the config.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ollamamq.config import BackendConfig, Config, ConfigError, UserConfig
from ollamamq.control.amp import (
    InvalidValue,
    ReloadFailed,
    UnknownBackend,
    UnknownRequest,
    UnknownUser,
)
from ollamamq.store import BackendOverride, State, UserOverride

from .controlfixture import ControlFixture

GPU1 = BackendConfig(url="http://gpu1:11434", name="gpu1", slots=1)
GPU2 = BackendConfig(url="http://gpu2:11434", name="gpu2", slots=2)


class UserTests(SynchronousTestCase):
    """
    User policy: config defaults, runtime values on top, clearing.
    """

    def setUp(self) -> None:
        self.f = ControlFixture(users={"alice": UserConfig(priority="boost", weight=2, maxQueued=9)})

    def test_runtimeOverConfig(self) -> None:
        """
        A runtime value wins over the config's, is marked as runtime, and is saved;
        clearing brings the config's values back and deletes the saved row.
        """
        entry = self.successResultOf(self.f.actions.setUser("alice", priority="vip"))
        self.assertEqual((entry["priority"], entry["weight"], entry["max_queued"]), ("vip", 2.0, 9))
        self.assertEqual(entry["runtime"], ["priority"])
        self.assertEqual(self.f.store.calls, [("putUser", UserOverride("alice", priority="vip"))])
        entry = self.successResultOf(self.f.actions.clearUser("alice"))
        self.assertEqual((entry["priority"], entry["runtime"]), ("boost", []))
        self.assertEqual(self.f.store.calls[-1], ("deleteUser", "alice"))

    def test_maxQueuedZeroClears(self) -> None:
        """
        C{max_queued} 0 (or L{None}) drops the runtime limit: the config's applies.
        """
        self.successResultOf(self.f.actions.setUser("alice", maxQueued=3))
        self.assertEqual(self.f.actions.user("alice")["max_queued"], 3)
        entry = self.successResultOf(self.f.actions.setUser("alice", maxQueued=0))
        self.assertEqual((entry["max_queued"], entry["runtime"]), (9, []))
        self.assertEqual(self.f.store.calls[-1], ("deleteUser", "alice"))

    def test_validationBeforeChange(self) -> None:
        """
        A bad field refuses the whole change: nothing applied, nothing saved.
        """
        self.assertRaises(InvalidValue, self.f.actions.setUser, "alice", priority="vip",
                          weight=0)
        self.assertRaises(InvalidValue, self.f.actions.setUser, "alice", blocked="yes")
        self.assertRaises(InvalidValue, self.f.actions.setUser, "alice", maxQueued=1.5)
        self.assertRaises(InvalidValue, self.f.actions.setUser, "a/b", weight=1)
        self.assertRaises(InvalidValue, self.f.actions.setUser, "x" * 200, weight=1)
        self.assertEqual(self.f.actions.user("alice")["priority"], "boost")
        self.assertEqual(self.f.store.calls, [])

    def test_unknownUser(self) -> None:
        """
        Reading or clearing a user nobody knows is L{UnknownUser}; setting creates it.
        """
        self.assertRaises(UnknownUser, self.f.actions.user, "zed")
        self.assertRaises(UnknownUser, self.f.actions.clearUser, "zed")
        self.successResultOf(self.f.actions.setUser("zed", blocked=True))
        self.assertTrue(self.f.actions.user("zed")["blocked"])

    def test_status(self) -> None:
        """
        C{/proxy/status} carries each user's blocked flag and runtime fields, the blocked
        addresses, and each backend's source.
        """
        self.successResultOf(self.f.actions.setUser("bob", blocked=True))
        self.successResultOf(self.f.actions.blockAddress("192.0.2.9"))
        status = self.f.actions.status()
        users = {u["id"]: u for u in status["users"]}
        self.assertEqual((users["bob"]["blocked"], users["bob"]["runtime"]), (True, ["blocked"]))
        self.assertEqual((users["alice"]["blocked"], users["alice"]["runtime"]), (False, []))
        self.assertEqual(status["blocked_ips"], ["192.0.2.9/32"])
        self.assertEqual(status["backends"][0]["source"], "config")
        self.assertEqual((status["queued"], status["active"]), (0, 0))

    def test_cancelUnknown(self) -> None:
        """
        Cancelling an id no queued request has is L{UnknownRequest}.
        """
        self.assertRaises(UnknownRequest, self.f.actions.cancelRequest, "nope")


class BackendTests(SynchronousTestCase):
    """
    Backends changed at runtime, and what is saved for them.
    """

    def setUp(self) -> None:
        self.f = ControlFixture(backends=(GPU1,))

    def test_addedSavedWithDefinition(self) -> None:
        """
        A backend added at runtime is saved with its URL and slots, and probed.
        """
        entry = self.successResultOf(self.f.actions.addBackend("http://gpu9:1/", slots=3))
        self.assertEqual((entry["name"], entry["source"]), ("gpu9:1", "runtime"))
        self.assertEqual(
            self.f.store.calls,
            [("putBackend", BackendOverride("gpu9:1", url="http://gpu9:1", slots=3, added=True))],
        )
        self.successResultOf(self.f.actions.removeBackend("gpu9:1"))
        self.assertEqual(self.f.store.calls[-1], ("deleteBackend", "gpu9:1"))

    def test_configuredRemovedAndBack(self) -> None:
        """
        Removing a configured backend is saved as a removal; adding it back (same URL)
        undoes the removal.
        """
        self.successResultOf(self.f.actions.removeBackend("gpu1"))
        self.assertEqual(self.f.store.calls[-1],
                         ("putBackend", BackendOverride("gpu1", removed=True)))
        self.assertRaises(UnknownBackend, self.f.actions.drainBackend, "gpu1")
        entry = self.successResultOf(self.f.actions.addBackend("http://gpu1:11434", name="gpu1"))
        self.assertEqual(entry["source"], "config")
        self.assertEqual(self.f.store.calls[-1], ("deleteBackend", "gpu1"))

    def test_drainAndSlotsSaved(self) -> None:
        """
        Draining and resizing a configured backend are saved; undoing them (undrain,
        the configured slots) deletes the row.
        """
        self.successResultOf(self.f.actions.drainBackend("gpu1"))
        self.successResultOf(self.f.actions.setSlots("gpu1", 4))
        self.assertEqual(self.f.store.calls[-1],
                         ("putBackend", BackendOverride("gpu1", slots=4, draining=True)))
        self.successResultOf(self.f.actions.drainBackend("gpu1", False))
        self.successResultOf(self.f.actions.setSlots("gpu1", 1))
        self.assertEqual(self.f.store.calls[-1], ("deleteBackend", "gpu1"))
        self.assertTrue(self.f.pool.get("gpu1").available)


class RestoreTests(SynchronousTestCase):
    """
    L{ControlActions.restore}: the saved overrides apply at startup.
    """

    def test_restore(self) -> None:
        """
        Saved user policy, blocks and backend changes are in force after restore; saved
        values that are no longer valid are skipped with a warning.
        """
        f = ControlFixture(backends=(GPU1, GPU2))
        f.actions.restore(
            State(
                users={
                    "alice": UserOverride("alice", priority="vip", weight=3.0),
                    "bob": UserOverride("bob", blocked=True),
                    "bad": UserOverride("bad", priority="gold"),
                },
                blocks=("10.0.0.0/8", "nonsense"),
                backends={
                    "gpu1": BackendOverride("gpu1", draining=True, slots=5),
                    "gpu2": BackendOverride("gpu2", removed=True),
                    "gpu9": BackendOverride("gpu9", url="http://gpu9:1", slots=2, added=True),
                },
            )
        )
        alice = f.actions.user("alice")
        self.assertEqual((alice["priority"], alice["weight"]), ("vip", 3.0))
        self.assertTrue(f.actions.user("bob")["blocked"])
        self.assertRaises(UnknownUser, f.actions.user, "bad")
        self.assertEqual(f.actions.status()["blocked_ips"], ["10.0.0.0/8"])
        self.assertEqual([b.name for b in f.pool.backends], ["gpu1", "gpu9"])
        self.assertTrue(f.pool.get("gpu1").draining)
        self.assertEqual(f.pool.get("gpu1").slots, 5)
        self.assertEqual(f.pool.get("gpu9").slots, 2)
        d = f.enqueue("carol", peer="10.1.1.1")
        self.assertEqual(d.outcome[0].value.status, 403)
        self.assertEqual(f.store.calls, [])


class ReloadTests(SynchronousTestCase):
    """
    L{ControlActions.reload}.
    """

    def setUp(self) -> None:
        self.f = ControlFixture(
            backends=(GPU1, GPU2),
            users={"alice": UserConfig(priority="boost")},
        )

    def test_backendsAddedRemovedChanged(self) -> None:
        """
        New backends are added and probed, dropped ones removed (running requests keep
        their lease), changed ones updated; queued requests stay queued.
        """
        running = self.f.enqueue("alice", "r0")
        lease = running.outcome[0]
        for _ in range(3):
            self.f.enqueue("alice")
        gpu3 = BackendConfig(url="http://gpu3:11434", name="gpu3", slots=1)
        self.f.nextConfig = Config(
            backends=(BackendConfig(url="http://gpu1-new:11434", name="gpu1", slots=3), gpu3),
            users={"alice": UserConfig(priority="boost")},
        )
        changes = self.f.actions.reload()
        self.assertEqual(changes, ["backend gpu1 changed", "backend gpu2 removed (draining)",
                                   "backend gpu3 added"])
        self.assertEqual([b.name for b in self.f.pool.backends], ["gpu1", "gpu3"])
        gpu1 = self.f.pool.get("gpu1")
        self.assertEqual((gpu1.url, gpu1.slots), ("http://gpu1-new:11434", 3))
        self.assertEqual(sorted(b.name for b in self.f.probed), ["gpu1", "gpu3"])
        self.assertFalse(lease._finished)
        self.assertGreater(self.f.scheduler.queued + self.f.scheduler.active, 1)
        self.assertEqual(self.f.actions.config, self.f.nextConfig)
        self.assertEqual(self.f.events[-1], ("config.reloaded", {"changes": changes}))

    def test_reportedSlots(self) -> None:
        """
        Backends whose new config sets no slots keep what they have and take what the
        backend reports from then on (a new one starts at 1); setting slots again in the
        config makes them fixed.
        """
        self.f.pool.get("gpu1").slots = 4
        unset = BackendConfig(url=GPU1.url, name="gpu1")
        gpu3 = BackendConfig(url="http://gpu3:11434", name="gpu3")
        self.f.nextConfig = Config(backends=(unset, gpu3),
                                   users={"alice": UserConfig(priority="boost")})
        self.f.actions.reload()
        gpu1, gpu3b = self.f.pool.get("gpu1"), self.f.pool.get("gpu3")
        self.assertEqual((gpu1.slots, gpu1.slotsFromBackend), (4, True))
        self.assertEqual((gpu3b.slots, gpu3b.slotsFromBackend), (1, True))
        self.f.nextConfig = Config(backends=(BackendConfig(url=GPU1.url, name="gpu1", slots=2), gpu3),
                                   users={"alice": UserConfig(priority="boost")})
        self.f.actions.reload()
        self.assertEqual((gpu1.slots, gpu1.slotsFromBackend), (2, False))

    def test_runtimeOverridesStay(self) -> None:
        """
        Runtime user policy, removals and drains stay on top of the reloaded config;
        users new in the config get their policy.
        """
        self.successResultOf(self.f.actions.setUser("alice", priority="vip"))
        self.successResultOf(self.f.actions.removeBackend("gpu2"))
        self.successResultOf(self.f.actions.drainBackend("gpu1"))
        self.f.nextConfig = Config(
            backends=(GPU1, GPU2),
            users={"alice": UserConfig(priority="normal", weight=4), "dave": UserConfig(weight=5)},
        )
        self.f.actions.reload()
        alice = self.f.actions.user("alice")
        self.assertEqual((alice["priority"], alice["weight"]), ("vip", 4.0))
        self.assertEqual(self.f.actions.user("dave")["weight"], 5.0)
        self.assertEqual([b.name for b in self.f.pool.backends], ["gpu1"])
        self.assertTrue(self.f.pool.get("gpu1").draining)

    def test_brokenConfigChangesNothing(self) -> None:
        """
        An invalid config is refused with its reason and one log line; nothing changes.
        """
        before = (self.f.actions.config, [b.describe() for b in self.f.pool.backends],
                  self.f.actions.users())
        self.f.nextConfig = ConfigError("server.timeout: expected a positive number, got -1")
        error = self.assertRaises(ReloadFailed, self.f.actions.reload)
        self.assertIn("server.timeout", str(error))
        after = (self.f.actions.config, [b.describe() for b in self.f.pool.backends],
                 self.f.actions.users())
        self.assertEqual(before, after)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_noConfigFile(self) -> None:
        """
        Without a config file, a reload says so.
        """
        self.f.actions.loadConfig = None
        error = self.assertRaises(ReloadFailed, self.f.actions.reload)
        self.assertIn("--config", str(error))

    def test_reconfigureHooks(self) -> None:
        """
        The other components get the new config after the pool and scheduler.
        """
        seen: list[Config] = []
        self.f.actions.reconfigure.append(seen.append)
        self.f.nextConfig = Config(backends=(GPU1, GPU2), timeout=7.0)
        self.assertEqual(self.f.actions.reload(), ["timeout changed", "user alice removed"])
        self.assertEqual(seen, [self.f.nextConfig])
