"""
Integration tests of authentication and abuse limits: real C{ollamamq-sim} and
C{twistd -n ollamamq} processes on 127.0.0.1, real clients (treq, the official C{openai},
C{anthropic} and C{ollama} clients), TLS with a certificate the test makes.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import time
from typing import Any

import anthropic
import httpx
import ollama
import openai
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import DeferredList, ensureDeferred

from tests.harness import ProcessTestCase, threaded
from tests.test_integration import simStats

CHAT = {"model": "llama3.2", "stream": False,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}]}

ALICE = "sk-alice-integration"
BOB = "sk-bob-integration"


def writeConfig(directory: str, text: str) -> str:
    """
    Write a config file into C{directory}; return its path.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "ollamamq.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def selfSignedCertificate(directory: str) -> tuple[str, str]:
    """
    Make a key and a self-signed certificate for C{localhost} and C{127.0.0.1}; return
    the paths of the key and certificate PEM files.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    keyPath = os.path.join(directory, "key.pem")
    certPath = os.path.join(directory, "cert.pem")
    with open(keyPath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


def sdkCalls(url: str) -> dict[str, Any]:
    """
    The official clients with and without keys (blocking; call in a thread): what they
    raise or answer.
    """
    found: dict[str, Any] = {}
    good = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
    found["openai"] = good.chat.completions.create(
        model="llama3.2", messages=CHAT["messages"]).choices[0].message.content
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    try:
        bad.chat.completions.create(model="llama3.2", messages=CHAT["messages"])
    except openai.AuthenticationError as e:
        found["openaiError"] = (e.status_code, e.body)
    client = anthropic.Anthropic(base_url=url, api_key="sk-wrong", max_retries=0)
    try:
        client.messages.create(model="llama3.2", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])
    except anthropic.AuthenticationError as e:
        found["anthropicError"] = (e.status_code, e.body)
    # The ollama client sends OLLAMA_API_KEY-style keys as Authorization: Bearer.
    found["ollama"] = ollama.Client(host=url, headers={"Authorization": f"Bearer {BOB}"}).chat(
        model="llama3.2", messages=CHAT["messages"]).message.content
    try:
        ollama.Client(host=url).chat(model="llama3.2", messages=CHAT["messages"])
    except ollama.ResponseError as e:
        found["ollamaError"] = (e.status_code, e.error)
    return found


class AuthRequiredTests(ProcessTestCase):
    """
    C{auth = "required"} with two keyed users and an unauthenticated client hammering.
    """

    async def test_keyedServedFairlyHammerOnly401(self) -> None:
        """
        Alice and Bob, six requests each at once against a one-slot backend, are served
        alternately while an unauthenticated client sends up to 900 requests over three
        connections (no key, wrong keys, a forged X-User-ID, a guessed admin key) over the
        same time: every one of those gets 401, none reaches the backend, and the keyed
        users' requests all succeed. The official SDKs read the 401s as authentication errors.
        """
        simURL, sim = await self.startSimulator(
            "--models", "llama3.2", "--tps", "200", "--tokens", "20", "--slots", "1")
        digest = "sha256:" + hashlib.sha256(BOB.encode()).hexdigest()
        config = writeConfig(self.mktemp(), f"""
[server]
auth = "required"

[users.alice]
keys = ["{ALICE}"]

[users.bob]
keys = ["{digest}"]
""")
        url, proxy = await self.startProxy("--config", config, "--backend", simURL, backends=1)

        finished: list[str] = []

        async def keyed(user: str, key: str) -> int:
            response = await self.http.post(
                url + "/api/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"})
            await treq.content(response)
            finished.append(user)
            return response.code

        hammerCodes: list[int] = []
        attempts = [
            {},
            {"Authorization": "Bearer " + ALICE[:-1]},
            {"X-User-ID": "alice"},
            {"x-api-key": "sk-nope"},
            {"Authorization": "Bearer " + ALICE[:-1] + "X"},
            {"X-Admin-Key": "guess"},
        ]
        deadline = time.monotonic() + 20

        async def hammer() -> None:
            for i in range(300):
                if time.monotonic() > deadline:
                    break
                response = await self.http.post(url + "/api/chat", json=CHAT,
                                                headers=attempts[i % len(attempts)])
                await treq.content(response)
                hammerCodes.append(response.code)

        calls = [ensureDeferred(keyed("alice", ALICE)) for _ in range(6)]
        calls += [ensureDeferred(keyed("bob", BOB)) for _ in range(6)]
        hammers = [ensureDeferred(hammer()) for _ in range(3)]
        results = await DeferredList(calls + hammers, fireOnOneErrback=True, consumeErrors=True)
        from twisted.python import log

        log.msg(f"auth integration: {len(hammerCodes)} unauthenticated requests, "
                f"served order {finished}")
        codes = [code for ok, code in results[:12]]
        self.assertEqual(codes, [200] * 12)
        self.assertGreater(len(hammerCodes), 50)
        self.assertEqual(set(hammerCodes), {401})
        # Fair: with one slot and both backlogged, neither gets two turns ahead.
        for n in range(2, 13):
            head = finished[:n]
            self.assertLessEqual(abs(head.count("alice") - head.count("bob")), 2, finished)
        stats = await threaded(simStats, simURL)
        self.assertEqual(stats["requests"], 12)
        for entry in stats["log"]:
            self.assertNotIn("authorization", entry["headers"])

        found = await threaded(sdkCalls, url)
        self.assertTrue(found["openai"])
        self.assertEqual(found["openaiError"][0], 401)
        self.assertEqual(found["openaiError"][1]["type"], "authentication_error")
        self.assertEqual(found["anthropicError"][0], 401)
        self.assertTrue(found["ollama"])
        self.assertEqual(found["ollamaError"][0], 401)
        for line in proxy.output:
            self.assertNotIn(ALICE, line)
            self.assertNotIn(BOB, line)
            self.assertNotIn("Traceback", line)


class TLSTests(ProcessTestCase):
    """
    C{--listen ssl:...}: Twisted's TLS endpoint with a certificate the test makes.
    """

    async def test_requestOverTLS(self) -> None:
        """
        The proxy answers over TLS: a chat through the official openai client, verifying
        the certificate, and the plain listener keeps working beside it.
        """
        simURL, sim = await self.startSimulator("--models", "llama3.2")
        keyPath, certPath = selfSignedCertificate(self.mktemp())
        url, proxy = await self.startProxy(
            "--listen", f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}",
            "--backend", simURL, backends=1)
        match = await proxy.waitFor(r"ollamamq listening on (https://[\d.]+:\d+)/")
        secure = match.group(1)

        def overTLS() -> tuple[str, int, int]:
            client = openai.OpenAI(base_url=secure + "/v1", api_key="unused", max_retries=0,
                                   http_client=httpx.Client(verify=certPath))
            answer = client.chat.completions.create(model="llama3.2",
                                                    messages=CHAT["messages"])
            refused = 0
            try:
                httpx.get(secure + "/health", verify=True)
            except httpx.ConnectError:
                refused = 1
            return (answer.choices[0].message.content,
                    httpx.get(secure + "/health", verify=certPath).status_code, refused)

        content, health, refused = await threaded(overTLS)
        self.assertTrue(content)
        self.assertEqual(health, 200)
        # An unknown certificate is refused by a verifying client: it really is TLS.
        self.assertEqual(refused, 1)
        response = await self.http.get(url + "/health")
        self.assertEqual(response.code, 200)
        await treq.content(response)
