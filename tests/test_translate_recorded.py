"""
The translators on answers recorded from the real llama-server (Gemma 3 270M), in
C{tests/data/llama-server/}, recorded once with C{tests/data/record_llama_server.py}:
every mapped field, streamed (fed in small pieces, as the network delivers them) and
whole.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.aggregate import _showFromOpenAI, psFromOpenAI, tagFromOpenAI
from ollamamq.errors import ANTHROPIC, OLLAMA
from ollamamq.translate.anthropic_openai import CountWhole, MessagesStream, MessagesWhole
from ollamamq.translate.common import SSEReader, errorAnswer
from ollamamq.translate.ollama_openai import EmbedWhole, OllamaStream, OllamaWhole

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "llama-server")


def recorded(name: str) -> dict:
    """
    One recorded exchange: C{request}, C{status}, C{content_type}, C{body} (text).
    """
    with open(os.path.join(DATA, name + ".json")) as f:
        return json.load(f)


def chunks(name: str) -> list[dict]:
    """
    The JSON chunks of a recorded stream (without C{[DONE]}).
    """
    reader = SSEReader()
    events = reader.feed(recorded(name)["body"].encode()) + reader.close()
    return [json.loads(data) for _, data in events if data.strip() != "[DONE]"]


def feed(translator: Any, body: str, size: int = 7) -> bytes:
    """
    Feed a recorded body through a stream translator in C{size}-byte pieces.
    """
    data = body.encode()
    out = b"".join(translator.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + translator.finish()


def ndjson(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def sseEvents(data: bytes) -> list[tuple[str, dict]]:
    reader = SSEReader()
    return [(n, json.loads(d)) for n, d in reader.feed(data) + reader.close()]


def final(name: str) -> dict:
    """
    The usage and timings a recorded stream ended with.
    """
    found: dict = {}
    for chunk in chunks(name):
        for field in ("usage", "timings"):
            if chunk.get(field):
                found[field] = chunk[field]
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                found["finish"] = choice["finish_reason"]
    return found


class RecordedOllamaTests(SynchronousTestCase):
    """
    llama-server's answers as Ollama answers.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_recordedStreams(self) -> None:
        """
        The recordings are real streams: they start with the assistant role and end with
        a usage chunk and C{[DONE]}.
        """
        body = recorded("chat_stream")["body"]
        self.assertTrue(recorded("chat_stream")["content_type"].startswith("text/event-stream"))
        self.assertTrue(body.rstrip().endswith("data: [DONE]"))
        self.assertIn("usage", final("chat_stream"))

    def test_chatStream(self) -> None:
        """
        A streamed chat: one NDJSON line per content chunk, the text the same as the
        unstreamed answer's (greedy sampling), then the final line with llama-server's
        counts and timings.
        """
        lines = ndjson(feed(OllamaStream("gemma3", self.clock, 0, "chat"),
                            recorded("chat_stream")["body"]))
        text = "".join(line["message"]["content"] for line in lines)
        whole = json.loads(recorded("chat_whole")["body"])
        self.assertEqual(text, whole["choices"][0]["message"]["content"])
        self.assertTrue(all(not line["done"] for line in lines[:-1]))
        last, end = lines[-1], final("chat_stream")
        self.assertEqual(last["done"], True)
        self.assertEqual(last["done_reason"], {"stop": "stop", "length": "length"}[end["finish"]])
        self.assertEqual(last["eval_count"], end["usage"]["completion_tokens"])
        self.assertEqual(last["prompt_eval_count"], end["usage"]["prompt_tokens"])
        self.assertEqual(last["prompt_eval_duration"], round(end["timings"]["prompt_ms"] * 1e6))
        self.assertEqual(last["eval_duration"], round(end["timings"]["predicted_ms"] * 1e6))
        self.assertEqual({line["model"] for line in lines}, {"gemma3"})

    def test_lengthStream(self) -> None:
        """
        A stream cut by C{max_tokens} ends with C{done_reason} C{length} and that many
        tokens.
        """
        lines = ndjson(feed(OllamaStream("g", self.clock, 0, "chat"),
                            recorded("chat_length_stream")["body"]))
        self.assertEqual((lines[-1]["done_reason"], lines[-1]["eval_count"]), ("length", 3))

    def test_chatWhole(self) -> None:
        """
        An unstreamed chat: the message, the finish reason and the counts.
        """
        exchange = recorded("chat_whole")
        answer = json.loads(exchange["body"])
        code, _, body = OllamaWhole("g", self.clock, 0, "chat").translate(
            exchange["status"], exchange["body"].encode())
        result = json.loads(body)
        self.assertEqual(code, 200)
        self.assertEqual(result["message"], {"role": "assistant",
                                             "content": answer["choices"][0]["message"]["content"]})
        self.assertEqual(result["eval_count"], answer["usage"]["completion_tokens"])
        self.assertEqual(result["prompt_eval_count"], answer["usage"]["prompt_tokens"])
        self.assertEqual(result["prompt_eval_duration"], round(answer["timings"]["prompt_ms"] * 1e6))
        self.assertIn(result["done_reason"], ("stop", "length"))

    def test_toolsAnsweredWithText(self) -> None:
        """
        Asked for a tool call, Gemma 3 270M (a base model; the shipped template has no
        tool format) answers text: that text is the content, whole and streamed, with no
        invented tool call. (Tool call answers are tested on OpenAI-shaped chunks in
        L{tests.test_translate_ollama_openai}.)
        """
        whole = json.loads(recorded("chat_tools_whole")["body"])
        self.assertNotIn("tool_calls", whole["choices"][0]["message"])
        result = json.loads(OllamaWhole("g", self.clock, 0, "chat").translate(
            200, recorded("chat_tools_whole")["body"].encode())[2])
        self.assertEqual(result["message"], {"role": "assistant",
                                             "content": whole["choices"][0]["message"]["content"]})
        lines = ndjson(feed(OllamaStream("g", self.clock, 0, "chat"),
                            recorded("chat_tools_stream")["body"], size=5))
        self.assertFalse([line for line in lines if "tool_calls" in line["message"]])
        self.assertEqual("".join(line["message"]["content"] for line in lines),
                         whole["choices"][0]["message"]["content"])
        self.assertEqual(lines[-1]["done_reason"], whole["choices"][0]["finish_reason"])

    def test_schema(self) -> None:
        """
        An answer under a JSON schema is that JSON, as the message content.
        """
        result = json.loads(OllamaWhole("g", self.clock, 0, "chat").translate(
            200, recorded("chat_schema_whole")["body"].encode())[2])
        value = json.loads(result["message"]["content"])
        self.assertEqual(set(value), {"colour", "count"})

    def test_generate(self) -> None:
        """
        A chat answer as C{/api/generate}: C{response}, not C{message}.
        """
        lines = ndjson(feed(OllamaStream("g", self.clock, 0, "generate"),
                            recorded("chat_stream")["body"]))
        whole = json.loads(recorded("chat_whole")["body"])
        self.assertEqual("".join(line["response"] for line in lines),
                         whole["choices"][0]["message"]["content"])

    def test_raw(self) -> None:
        """
        A raw completion, streamed and whole: the same text, its counts.
        """
        whole = json.loads(recorded("completion_whole")["body"])
        lines = ndjson(feed(OllamaStream("g", self.clock, 0, "raw"), recorded("completion_stream")["body"]))
        self.assertEqual("".join(line["response"] for line in lines), whole["choices"][0]["text"])
        self.assertEqual(lines[-1]["eval_count"], final("completion_stream")["usage"]["completion_tokens"])
        result = json.loads(OllamaWhole("g", self.clock, 0, "raw").translate(
            200, recorded("completion_whole")["body"].encode())[2])
        self.assertEqual(result["response"], whole["choices"][0]["text"])
        self.assertEqual(result["done_reason"], "length")

    def test_embeddings(self) -> None:
        """
        Embeddings in input order, with the prompt count; the legacy route's single
        vector.
        """
        exchange = recorded("embeddings")
        answer = json.loads(exchange["body"])
        result = json.loads(EmbedWhole("g", self.clock, 0, None, 2).translate(
            200, exchange["body"].encode())[2])
        self.assertEqual(result["embeddings"], [d["embedding"] for d in answer["data"]])
        self.assertEqual(result["prompt_eval_count"], answer["usage"]["prompt_tokens"])
        self.assertGreater(len(result["embeddings"][0]), 100)

    def test_error(self) -> None:
        """
        llama-server's error (a prompt over the context) keeps its status and message,
        in each client's shape.
        """
        exchange = recorded("chat_error")
        message = json.loads(exchange["body"])["error"]["message"]
        self.assertGreaterEqual(exchange["status"], 400)
        code, _, body = errorAnswer(exchange["status"], exchange["body"].encode(), OLLAMA)
        self.assertEqual((code, json.loads(body)), (exchange["status"], {"error": message}))
        code, _, body = errorAnswer(exchange["status"], exchange["body"].encode(), ANTHROPIC)
        self.assertEqual(json.loads(body)["error"]["message"], message)

    def test_listingAndShow(self) -> None:
        """
        C{/api/tags}, C{/api/ps} and C{/api/show} entries from llama-server's
        C{/v1/models} C{meta} and C{/props}.
        """
        entry = json.loads(recorded("models")["body"])["data"][0]
        props = json.loads(recorded("props")["body"])
        tag = tagFromOpenAI(entry)
        self.assertEqual(tag["size"], entry["meta"]["size"])
        self.assertTrue(tag["details"]["parameter_size"].endswith("M"))
        self.assertEqual(psFromOpenAI(entry)["context_length"], entry["meta"]["n_ctx_train"])
        show = _showFromOpenAI(entry, props)
        self.assertEqual(show["template"], props["chat_template"])
        self.assertEqual(show["parameters"],
                         f"num_ctx {props['default_generation_settings']['n_ctx']}")
        self.assertEqual(show["model_info"]["general.parameter_count"], entry["meta"]["n_params"])


class RecordedAnthropicTests(SynchronousTestCase):
    """
    llama-server's chat completions as Anthropic messages.
    """

    def test_stream(self) -> None:
        """
        A streamed chat as Messages events: the text deltas make the whole answer's
        text; the end has the stop reason and usage.
        """
        out = sseEvents(feed(MessagesStream("gemma3"), recorded("chat_stream")["body"]))
        names = [n for n, _ in out]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(names[-2:], ["message_delta", "message_stop"])
        text = "".join(e["delta"]["text"] for n, e in out if n == "content_block_delta")
        whole = json.loads(recorded("chat_whole")["body"])
        self.assertEqual(text, whole["choices"][0]["message"]["content"])
        end = final("chat_stream")
        usage = out[-2][1]["usage"]
        cached = end["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        self.assertEqual(usage["input_tokens"] + usage.get("cache_read_input_tokens", 0),
                         end["usage"]["prompt_tokens"])
        self.assertEqual(usage.get("cache_read_input_tokens", 0), cached)
        self.assertEqual(usage["output_tokens"], end["usage"]["completion_tokens"])
        self.assertEqual(out[-2][1]["delta"]["stop_reason"],
                         {"stop": "end_turn", "length": "max_tokens"}[end["finish"]])

    def test_whole(self) -> None:
        """
        An unstreamed chat as a message.
        """
        answer = json.loads(recorded("chat_whole")["body"])
        message = MessagesWhole("g").message(answer)
        self.assertEqual(message["content"], [{"type": "text",
                                               "text": answer["choices"][0]["message"]["content"]}])
        self.assertEqual(message["usage"]["output_tokens"], answer["usage"]["completion_tokens"])

    def test_toolsAnsweredWithText(self) -> None:
        """
        The model's text answer to a tool request is one text block, streamed; the stop
        reason is the length cut.
        """
        out = sseEvents(feed(MessagesStream("g"), recorded("chat_tools_stream")["body"], size=5))
        starts = [e["content_block"]["type"] for n, e in out if n == "content_block_start"]
        self.assertEqual(starts, ["text"])
        self.assertEqual(out[-2][1]["delta"]["stop_reason"], "max_tokens")

    def test_count(self) -> None:
        """
        A token count is the completion's prompt tokens.
        """
        answer = json.loads(recorded("chat_whole")["body"])
        body = CountWhole().translate(200, recorded("chat_whole")["body"].encode())[2]
        self.assertEqual(json.loads(body), {"input_tokens": answer["usage"]["prompt_tokens"]})
