"""
Tests for L{ollamamq.backends}: state, slot accounting and least-connections choice.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ollamamq.backends import (
    OLLAMA,
    OPENAI,
    Backend,
    BackendPool,
    DuplicateBackend,
    UnknownBackend,
)

ANY = frozenset({OLLAMA, OPENAI})
NATIVE = frozenset({OLLAMA})


def onlinePool(*specs: tuple[str, str, list[str], int]) -> BackendPool:
    """
    A pool of online backends from (name, kind, models, slots) tuples.
    """
    pool = BackendPool()
    for name, kind, models, slots in specs:
        backend = pool.add(Backend(name=name, url=f"http://{name}", slots=slots))
        pool.markOnline(backend, kind, models)
    return pool


class ChooseTests(SynchronousTestCase):
    """
    L{BackendPool.choose}: eligibility, preference, rotation.
    """

    def test_onlyEligible(self) -> None:
        """
        Only online backends of a fitting kind that list the model are chosen.
        """
        pool = onlinePool(("a", OLLAMA, ["llama3"], 1), ("b", OPENAI, ["qwen"], 1))
        self.assertEqual(pool.choose(NATIVE, "llama3:latest").name, "a")
        self.assertIsNone(pool.choose(NATIVE, "qwen:latest"))
        self.assertEqual(pool.choose(ANY, "qwen:latest").name, "b")
        self.assertIsNone(pool.choose(ANY, "mistral:latest"))

    def test_unknownAndOfflineGetNothing(self) -> None:
        """
        A backend not yet probed, or offline, or draining, gets no request.
        """
        pool = BackendPool([Backend(name="a", url="http://a")])
        self.assertIsNone(pool.choose(ANY, None))
        a = pool.get("a")
        pool.markOnline(a, OLLAMA, ["m"])
        self.assertIs(pool.choose(ANY, None), a)
        pool.markOffline(a, "refused")
        self.assertIsNone(pool.choose(ANY, None))
        self.assertTrue(pool.knows("m:latest"))
        pool.markOnline(a, OLLAMA, ["m"])
        pool.drain("a")
        self.assertIsNone(pool.choose(ANY, None))
        pool.drain("a", False)
        self.assertIs(pool.choose(ANY, None), a)

    def test_slotsRespected(self) -> None:
        """
        A backend whose slots are all in use is not chosen.
        """
        pool = onlinePool(("a", OLLAMA, ["m"], 2))
        a = pool.get("a")
        pool.acquire(a)
        self.assertIs(pool.choose(ANY, "m:latest"), a)
        pool.acquire(a)
        self.assertIsNone(pool.choose(ANY, "m:latest"))
        pool.release(a)
        self.assertIs(pool.choose(ANY, "m:latest"), a)

    def test_leastLoadedThenRoundRobin(self) -> None:
        """
        The least loaded (per slot) backend wins; ties are taken in turn.
        """
        pool = onlinePool(("a", OLLAMA, ["m"], 2), ("b", OLLAMA, ["m"], 2))
        picks = {pool.choose(ANY, "m:latest").name for _ in range(4)}
        self.assertEqual(picks, {"a", "b"})
        pool.acquire(pool.get("a"))
        self.assertEqual({pool.choose(ANY, "m:latest").name for _ in range(4)}, {"b"})

    def test_loadedPreferred(self) -> None:
        """
        A backend that has the model in memory is preferred even when busier.
        """
        pool = onlinePool(("a", OLLAMA, ["m"], 4), ("b", OLLAMA, ["m"], 4))
        b = pool.get("b")
        pool.markOnline(b, OLLAMA, ["m"], loaded=["m:latest"])
        pool.acquire(b)
        self.assertEqual(pool.choose(ANY, "m:latest").name, "b")

    def test_exclude(self) -> None:
        """
        Excluded backends (already tried) are skipped.
        """
        pool = onlinePool(("a", OLLAMA, ["m"], 1), ("b", OLLAMA, ["m"], 1))
        self.assertEqual(pool.choose(ANY, "m:latest", exclude=[pool.get("a")]).name, "b")


class PoolTests(SynchronousTestCase):
    """
    Adding, removing, draining and change notification.
    """

    def test_subscribersNotified(self) -> None:
        """
        Changes that affect what can be served notify the subscribers; a repeated
        offline report does not.
        """
        pool = BackendPool()
        calls = []
        pool.subscribe(lambda: calls.append(1))
        backend = pool.add(Backend(name="a", url="http://a"))
        pool.markOnline(backend, OLLAMA, ["m"])
        pool.markOffline(backend, "x")
        pool.markOffline(backend, "x")
        pool.drain("a")
        pool.remove("a")
        self.assertEqual(len(calls), 5)

    def test_namesAreUnique(self) -> None:
        """
        Adding a taken name fails; unknown names raise L{UnknownBackend}.
        """
        pool = BackendPool([Backend(name="a", url="http://a")])
        self.assertRaises(DuplicateBackend, pool.add, Backend(name="a", url="http://b"))
        self.assertRaises(UnknownBackend, pool.get, "z")
        self.assertRaises(UnknownBackend, pool.remove, "z")

    def test_removedBackendKeepsAccounting(self) -> None:
        """
        A removed backend gets nothing new, and its running requests still release.
        """
        pool = onlinePool(("a", OLLAMA, ["m"], 1))
        a = pool.get("a")
        pool.acquire(a)
        pool.remove("a")
        self.assertIsNone(pool.choose(ANY, None))
        pool.release(a)
        self.assertEqual(a.active, 0)
        self.assertRaises(AssertionError, pool.release, a)

    def test_settledAndHolders(self) -> None:
        """
        The pool is settled once every backend was probed; holders lists available
        backends with the model, loaded first.
        """
        self.assertFalse(BackendPool().settled)  # --demo: backends come a moment later
        pool = BackendPool([Backend(name="a", url="http://a"), Backend(name="b", url="http://b")])
        self.assertFalse(pool.settled)
        pool.markOnline(pool.get("a"), OLLAMA, ["m"])
        pool.markOnline(pool.get("b"), OLLAMA, ["m"], loaded=["m"])
        self.assertTrue(pool.settled)
        self.assertEqual([b.name for b in pool.holders(NATIVE, "m:latest")], ["b", "a"])

    def test_describe(self) -> None:
        """
        The status entry has the documented fields, with names as the backend spells them.
        """
        pool = onlinePool(("a", OLLAMA, ["Llama3:8B"], 2))
        entry = pool.get("a").describe()
        self.assertEqual(entry["models"], ["Llama3:8B"])
        for field in ("name", "url", "online", "kind", "slots", "active", "loaded"):
            self.assertIn(field, entry)
        self.assertEqual(pool.get("a").modelName("llama3:8b"), "Llama3:8B")


class NotificationTests(SynchronousTestCase):
    """
    Repeated identical probe results do not wake the subscribers.
    """

    def test_sameProbeNoNotification(self) -> None:
        """
        Only a change of state, kind, models or loaded models notifies.
        """
        pool = BackendPool([Backend(name="a", url="http://a")])
        calls = []
        pool.subscribe(lambda: calls.append(1))
        a = pool.get("a")
        pool.markOnline(a, OLLAMA, ["m"], latency=0.1)
        pool.markOnline(a, OLLAMA, ["m"], latency=0.2)
        self.assertEqual(len(calls), 1)
        pool.markOnline(a, OLLAMA, ["m"], loaded=["m"])
        pool.markOnline(a, OLLAMA, ["m", "n"], loaded=["m"])
        self.assertEqual(len(calls), 3)


class SetSlotsTests(SynchronousTestCase):
    """
    L{BackendPool.setSlots}.
    """

    def test_setSlots(self) -> None:
        """
        More slots take more requests at once and notify the subscribers; fewer than the
        running count leave none free until they finish; bad values are refused.
        """
        pool = onlinePool(("a", OLLAMA, ["m"], 1))
        changes: list[None] = []
        pool.subscribe(lambda: changes.append(None))
        a = pool.get("a")
        pool.acquire(a)
        pool.setSlots("a", 3)
        self.assertEqual((a.slots, a.free, len(changes)), (3, 2, 1))
        pool.acquire(a)
        pool.setSlots("a", 1)
        self.assertEqual(a.free, 0)
        for bad in (0, -1, 1.5, True):
            self.assertRaises(ValueError, pool.setSlots, "a", bad)
        # Slots set so are fixed: no longer taken from what the backend reports.
        a.slotsFromBackend = True
        pool.setSlots("a", 2)
        self.assertFalse(a.slotsFromBackend)
        self.assertRaises(UnknownBackend, pool.setSlots, "zz", 2)
