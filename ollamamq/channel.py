# -*- test-case-name: tests.test_channel -*-
"""
The client connection's own limits, enforced by the HTTP channel before a request reaches
the route table (so a slow or oversized request never queues, let alone holds a slot):

  - C{client_timeout}: a client must send a request's headers within C{client_timeout}
    seconds of its first byte, and its body at an average of at least L{MIN_BODY_RATE}
    bytes per second beyond that (so a large upload on a slow link passes, while a client
    trickling a byte at a time does not). One that is too slow gets a 408 and is
    disconnected. A connection with no request under way (just opened, or kept alive
    after a response) is closed after C{client_timeout} seconds of silence.
  - C{max_header_bytes}: a request line and headers over this many bytes get 431 (414
    when the request line alone is over), as does a single header line over it.

twisted.web's L{HTTPChannel} has the pieces (C{totalHeadersSize}, the line length limit,
an idle timeout that every byte resets) but answers a bare 400 for too many header bytes
and cannot tell a trickling client from a working one; this subclass changes just that.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel

from ollamamq.errors import HeadersTooLarge, ProxyError, RequestTimeout, TargetTooLong, errorResponse
from ollamamq.front import familyFor

log = Logger()

# Bytes per second a request body must average once the grace of client_timeout is used.
MIN_BODY_RATE = 64 * 1024

_IDLE = "idle"
_RECEIVING = "receiving"
_HANDLING = "handling"
_CLOSING = "closing"


def _targetOf(line: bytes) -> bytes:
    """
    The request target of a (possibly partial) request line, for the error's shape.
    """
    parts = line.split(b" ")
    return parts[1] if len(parts) > 1 and parts[1].startswith(b"/") else b"/"


def guardedChannel(clock: IReactorTime, clientTimeout: float, maxHeaderBytes: int) -> type:
    """
    An L{HTTPChannel} class enforcing C{clientTimeout} and C{maxHeaderBytes} (see the
    module docstring), for C{Site.protocol}.

    @param clock: for the timeouts.
    """

    class GuardedChannel(HTTPChannel):
        totalHeadersSize = maxHeaderBytes
        # One line may be as long as all of them together, no longer.
        MAX_LENGTH = maxHeaderBytes

        _state = _IDLE
        _started = 0.0
        _received = 0
        _guard: IDelayedCall | None = None

        def connectionMade(self) -> None:
            super().connectionMade()
            self._waitIdle()

        def dataReceived(self, data: bytes) -> None:
            if self._state == _CLOSING:
                return
            if self._state == _IDLE and data:
                self._state = _RECEIVING
                self._started = clock.seconds()
                self._received = 0
                self._arm(clientTimeout)
            if self._state == _RECEIVING:
                self._received += len(data)
            super().dataReceived(data)

        def lineReceived(self, line: bytes) -> None:
            if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
                self._tooLarge(line)
                return
            super().lineReceived(line)

        def lineLengthExceeded(self, line: bytes) -> None:
            self._tooLarge(line)

        def allContentReceived(self) -> None:
            # The request is complete: from here on it is the route's (and the relay's
            # idle timeout's) business.
            if self._state != _CLOSING:
                self._state = _HANDLING
            self._cancelGuard()
            super().allContentReceived()

        def requestDone(self, request: Any) -> None:
            # Idle first: finishing may feed a pipelined next request straight in.
            self._waitIdle()
            super().requestDone(request)

        def connectionLost(self, reason: Any) -> None:
            self._state = _CLOSING
            self._cancelGuard()
            super().connectionLost(reason)

        def loseConnection(self) -> None:
            # Once closing, nothing more is timed, and a second close (the front refused
            # the request and then a timer fired before the transport went) is a no-op
            # rather than HTTPChannel's RuntimeError.
            self._cancelGuard()
            if self._state == _CLOSING:
                return
            self._state = _CLOSING
            super().loseConnection()

        def _waitIdle(self) -> None:
            if self._state == _CLOSING:
                return
            self._state = _IDLE
            self._arm(clientTimeout)

        def _arm(self, delay: float) -> None:
            self._cancelGuard()
            self._guard = clock.callLater(delay, self._check)

        def _cancelGuard(self) -> None:
            if self._guard is not None and self._guard.active():
                self._guard.cancel()
            self._guard = None

        def _check(self) -> None:
            self._guard = None
            if self._state == _IDLE:
                # Nothing under way: close quietly, as any keep-alive timeout does.
                self.loseConnection()
                return
            if self._state != _RECEIVING:
                return
            deadline = self._started + clientTimeout + self._received / MIN_BODY_RATE
            now = clock.seconds()
            if now < deadline:
                # The bytes that came meanwhile bought more time.
                self._arm(deadline - now)
                return
            target = getattr(self, "_path", None) or b"/"
            log.info("Timing out a slow client: {peer}", peer=str(self.transport.getPeer()))
            self._refuse(RequestTimeout(
                f"the request was not received within {clientTimeout:g} seconds",
                code="request_timeout",
            ), target)

        def _tooLarge(self, line: bytes) -> None:
            path = getattr(self, "_path", None)
            error: ProxyError
            if path is None:
                error = TargetTooLong(
                    f"the request line is over {maxHeaderBytes} bytes", code="uri_too_long"
                )
                path = _targetOf(line)
            else:
                error = HeadersTooLarge(
                    f"the request headers are over {maxHeaderBytes} bytes",
                    code="headers_too_large",
                )
            self._refuse(error, path)

        def _refuse(self, error: ProxyError, path: bytes) -> None:
            # Like twisted.web's own _respondToBadRequestAndDisconnect: the request object
            # is not set up yet, so answer on the transport and hang up instead of reading
            # the rest.
            self._cancelGuard()
            self.dataReceived = self.lineReceived = lambda *args: None  # type: ignore
            self.transport.write(errorResponse(error, familyFor(path.split(b"?", 1)[0])))
            self.loseConnection()

    return GuardedChannel
