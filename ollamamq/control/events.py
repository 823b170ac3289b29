# -*- test-case-name: tests.test_control_events -*-
"""
The control plane's event stream: one hub that the scheduler, the pool and the operator
actions publish to, and that AMP subscribers and SSE clients read from.

Event names and payloads are documented in L{ollamamq.control.amp}. Each subscriber
bounds its own backlog (an AMP connection by unanswered events, an SSE client by its
transport's buffer), so the hub itself holds nothing per event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

TOTALS_INTERVAL = 0.5
"""
The least time between two C{totals} events: at most twice a second.
"""


class Subscriber(Protocol):
    """
    What the hub delivers to.
    """

    def event(self, name: str, payload: dict) -> None:
        """
        Take one event; must not raise, must not call back into the scheduler, and must
        keep its own backlog bounded.
        """


class EventHub:
    """
    Fans events out to subscribers and coalesces the C{totals} event.
    """

    def __init__(self, clock: IReactorTime, totals: Callable[[], dict]) -> None:
        """
        @param totals: makes the C{totals} payload from the current state.
        """
        self._clock = clock
        self._totals = totals
        self._subscribers: list[Subscriber] = []
        self._lastTotals: dict | None = None
        self._lastSent = float("-inf")
        self._pending: IDelayedCall | None = None

    @property
    def clock(self) -> IReactorTime:
        """
        The clock events are timed on.
        """
        return self._clock

    @property
    def subscribers(self) -> int:
        """
        How many subscribers are attached.
        """
        return len(self._subscribers)

    def subscribe(self, subscriber: Subscriber) -> None:
        """
        Deliver every later event to C{subscriber}.
        """
        if subscriber not in self._subscribers:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """
        Stop delivering to C{subscriber} (no error when it was not subscribed).
        """
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def publish(self, name: str, payload: dict) -> None:
        """
        Deliver an event to every subscriber, then see whether the totals changed.
        """
        for subscriber in list(self._subscribers):
            try:
                subscriber.event(name, payload)
            except Exception:
                # One broken subscriber must not cost the others their events, nor the
                # scheduler its dispatch loop.
                log.failure("Event subscriber {subscriber!r} failed; dropping it",
                            subscriber=subscriber)
                self.unsubscribe(subscriber)
        if name != "totals":
            self.totalsMayHaveChanged()

    def totalsMayHaveChanged(self) -> None:
        """
        Send a C{totals} event soon if they changed: at once when the last one is older
        than L{TOTALS_INTERVAL}, else when that interval is over, once however many
        changes came in between.
        """
        if self._pending is not None or not self._subscribers:
            return
        delay = max(0.0, self._lastSent + TOTALS_INTERVAL - self._clock.seconds())
        self._pending = self._clock.callLater(delay, self._sendTotals)

    def _sendTotals(self) -> None:
        """
        Publish the totals when they differ from the last ones sent.
        """
        self._pending = None
        totals = self._totals()
        if totals == self._lastTotals:
            return
        self._lastTotals = totals
        self._lastSent = self._clock.seconds()
        self.publish("totals", totals)

    def stop(self) -> None:
        """
        Cancel a pending C{totals} event (the daemon is stopping).
        """
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
