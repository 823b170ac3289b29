# -*- test-case-name: tests.test_translate_plan -*-
"""
When a request is translated, and how its translated answer reaches the client.

The rule: a request is translated only when the backend it was granted does not speak
its dialect (L{ollamamq.front.dialectsFor}; the probes record what each backend speaks).

  - A translatable request (Ollama's C{/api/chat}, C{/api/generate}, C{/api/embed},
    C{/api/embeddings}; Anthropic's C{/v1/messages} and C{count_tokens}) may go to a
    backend that speaks only OpenAI's dialect only when no available backend that
    speaks its own has the model (L{Translator.kindsFor}). A native backend is always
    preferred, even when it is busy: its answer is the dialect's own (Ollama's token
    contexts and load times, Anthropic's stop sequences), and the request waits in its
    user's queue either way.
  - A backend that claims the Messages dialect but answers it 404, 405 or 501 (a build
    without the route) is remembered (L{Translator.lacksMessages}); this and later
    Messages requests are sent to it as chat completions.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.client import ResponseFailed
from twisted.web.iweb import IRequest, IResponse

from ollamamq.backends import OPENAI_API, Backend, BackendPool
from ollamamq.errors import BadGateway
from ollamamq.front import dialectsFor
from ollamamq.relay import BodyTooLong, Relay, describeFailure, forwardedHeaders
from ollamamq.translate import anthropic_openai, ollama_openai
from ollamamq.translate.common import (
    EVENT_STREAM,
    JSON_TYPE,
    MAX_WHOLE,
    NDJSON,
    TranslatedResponse,
    Translation,
    jsonLine,
    untranslatable,
)

OLLAMA_ROUTES = frozenset({b"/api/chat", b"/api/generate", b"/api/embed", b"/api/embeddings"})
ANTHROPIC_ROUTES = frozenset({b"/v1/messages", b"/v1/messages/count_tokens"})
TRANSLATABLE = OLLAMA_ROUTES | ANTHROPIC_ROUTES

#: Statuses of a backend that has no such route.
MISSING_ROUTE = frozenset({404, 405, 501})

# Headers of a backend answer that describe its body, not the translated one.
_REPLACED = frozenset({b"content-type", b"content-length", b"content-encoding"})


class Translator:
    """
    Decides per request and backend whether to translate, and relays translated answers.

    @ivar clock: for the durations and times in translated answers.
    @ivar relay: streams and collects backend answers.
    """

    def __init__(self, clock: IReactorTime, relay: Relay) -> None:
        self.clock = clock
        self.relay = relay
        self._noMessages: set[str] = set()

    def acceptable(self, path: bytes) -> frozenset[str]:
        """
        Every dialect a request on C{path} can be served in: its own, and OpenAI's when
        the route is translatable.
        """
        native = dialectsFor(path)
        return native | {OPENAI_API} if path in TRANSLATABLE else native

    def kindsFor(self, path: bytes, model: str | None, pool: BackendPool) -> frozenset[str]:
        """
        The dialects a request may be granted a backend of: its own, or OpenAI's too when
        the route is translatable and no available backend of its own dialect has the
        model.
        """
        native = dialectsFor(path)
        if path in TRANSLATABLE and model is not None and not pool.canServe(native, model):
            return native | {OPENAI_API}
        return native

    def needed(self, path: bytes, backend: Backend) -> bool:
        """
        Whether a request on C{path} must be translated for C{backend}.
        """
        if path not in TRANSLATABLE:
            return False
        if path in ANTHROPIC_ROUTES and backend.name in self._noMessages:
            return True
        return backend.dialects.isdisjoint(dialectsFor(path))

    def lacksMessages(self, path: bytes, backend: Backend, response: IResponse) -> bool:
        """
        Whether C{response} to a native Anthropic request says C{backend} has no Messages
        route after all; it is then remembered, and the caller sends it again translated.
        """
        if path not in ANTHROPIC_ROUTES or response.code not in MISSING_ROUTE:
            return False
        self._noMessages.add(backend.name)
        return True

    def translate(self, path: bytes, body: dict, requested: str) -> Translation:
        """
        The translation of a request on C{path}.

        @param body: the request as it would go natively (model rules applied, model
            spelled as the granted backend spells it).
        @param requested: the model as the client named it (echoed in answers).
        @raise ollamamq.errors.BadRequest: what cannot be translated faithfully.
        """
        if path in ANTHROPIC_ROUTES:
            return anthropic_openai.translateRequest(path, body, requested, self.clock)
        return ollama_openai.translateRequest(path, body, requested, self.clock)

    def answerLocally(self, request: IRequest, translation: Translation) -> bytes:
        """
        Answer a translation the proxy answers itself (L{Translation.local}).
        """
        request.setResponseCode(200)
        if translation.stream:
            request.setHeader(b"content-type", NDJSON)
            return jsonLine(translation.local)
        request.setHeader(b"content-type", JSON_TYPE)
        return json.dumps(translation.local).encode("utf-8")

    async def respond(self, request: IRequest, response: IResponse, translation: Translation,
                      account: Any = None, headers: dict[bytes, bytes] | None = None) -> None:
        """
        Relay C{response} to C{request}, translated: streamed as it arrives when the
        client asked for a stream and the backend streams, else collected and answered
        whole (errors too, reshaped for the client).

        @param account: the L{ollamamq.usage.StreamAccount} the translated body goes
            through (it reads the client's dialect).
        @param headers: the proxy's own response headers, set over the backend's.
        @raise BadGateway: the backend failed before its whole answer arrived.
        """
        contentType = b";".join(response.headers.getRawHeaders(b"content-type", [])).lower()
        if translation.stream and 200 <= response.code < 300 and EVENT_STREAM in contentType \
                and translation.streamed is not None:
            await self.relay.stream(request, TranslatedResponse(response, translation.streamed()),
                                    translation.family, account, headers)
            return
        assert translation.whole is not None
        try:
            body = await self.relay.collect(response, MAX_WHOLE)
        except BodyTooLong:
            code, kind, data = untranslatable(f"the answer is over {MAX_WHOLE} bytes",
                                              translation.family)
        except ResponseFailed as e:
            reason = describeFailure(e.reasons[0]) if e.reasons else "connection lost"
            raise BadGateway(f"backend failed while answering: {reason}",
                             code="backend_failed") from None
        else:
            code, kind, data = translation.whole().translate(response.code, body)
        if account is not None:
            account.started(EVENT_STREAM in kind, True)
            data = account.feed(data) + account.finish()
        request.setResponseCode(code)
        for name, values in forwardedHeaders(response.headers).getAllRawHeaders():
            if name.lower() not in _REPLACED:
                request.responseHeaders.setRawHeaders(name, values)
        for name, value in (headers or {}).items():
            request.responseHeaders.setRawHeaders(name, [value])
        request.setHeader(b"content-type", kind)
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
