"""
Tests for L{ollamamq.models}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ollamamq.config import ConfigError, ModelRule
from ollamamq.models import ModelCatalog, Resolution, canonicalModel, versionKey

# (a, b, same model?)
MATCHES = [
    ("llama3:8b", "llama3:8b", True),
    ("Llama3:8B", "llama3:8b", True),
    ("  llama3:8b ", "llama3:8b", True),
    ("llama3", "llama3:latest", True),
    ("LLAMA3", "llama3:Latest", True),
    ("llama3:8b", "llama3:70b", False),
    ("llama3", "llama3:8b", False),
    ("llama3:latest", "llama3:8b", False),
    ("llama3", "llama3.1", False),
    ("hf.co/user/repo:Q4_K_M", "hf.co/User/Repo:q4_k_m", True),
    ("hf.co/user/repo:Q4_K_M", "hf.co/user/repo:Q8_0", False),
    ("hf.co/user/repo", "hf.co/user/repo:latest", True),
    ("library/llama3", "llama3", True),
    ("registry.ollama.ai/library/llama3:8b", "llama3:8b", True),
    ("registry.ollama.ai/jmorgan/model", "jmorgan/model:latest", True),
    ("jmorgan/llama3", "llama3", False),
    ("localhost:5000/team/model", "localhost:5000/team/model:latest", True),
    ("localhost:5000/team/model", "team/model", False),
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/llama-3.1-8b-instruct", True),
]


class CanonicalModelTests(SynchronousTestCase):
    """
    Tests for L{canonicalModel}.
    """

    def test_matchingTable(self) -> None:
        """
        Two names share a key exactly when they name the same model: case and an implied
        C{:latest} or default namespace do not matter, explicit tags and other
        namespaces do.
        """
        for a, b, same in MATCHES:
            self.assertEqual(
                canonicalModel(a) == canonicalModel(b), same, f"{a!r} vs {b!r}"
            )

    def test_keys(self) -> None:
        """
        The key is the lower-cased, fully tagged short name.
        """
        self.assertEqual(canonicalModel("Llama3"), "llama3:latest")
        self.assertEqual(canonicalModel("library/Qwen2.5:7B"), "qwen2.5:7b")
        self.assertEqual(canonicalModel("library/"), "library/:latest")


def catalog() -> ModelCatalog:
    """
    A catalog with one aliased model carrying both options, and one plain rule.
    """
    return ModelCatalog(
        {
            "llama3:8b": ModelRule(
                name="llama3:8b",
                aliases=("gpt-4o-mini", "Fast"),
                keepAlive="30m",
                numCtx=8192,
            ),
            "qwen2.5:7b": ModelRule(
                name="qwen2.5:7b", numCtx=4096, keepAlive=-1,
                enforce=frozenset({"num_ctx", "keep_alive"}),
            ),
        }
    )


class ResolveTests(SynchronousTestCase):
    """
    Tests for L{ModelCatalog.resolve} and L{ModelCatalog.aliases}.
    """

    def test_alias(self) -> None:
        """
        An alias resolves to its rule's model, case-insensitively; an untagged alias
        also matches C{alias:latest}.
        """
        rule = catalog().resolve("gpt-4o-mini").rule
        for name in ("gpt-4o-mini", "GPT-4o-Mini", "gpt-4o-mini:latest", "fast", "FAST"):
            resolution = catalog().resolve(name)
            self.assertEqual(resolution, Resolution(name, "llama3:8b", rule, True))
            self.assertEqual(resolution.model, "llama3:8b")

    def test_aliasWithOtherTag(self) -> None:
        """
        An alias with another explicit tag is not the alias.
        """
        resolution = catalog().resolve("gpt-4o-mini:large")
        self.assertEqual(resolution, Resolution("gpt-4o-mini:large", "gpt-4o-mini:large"))

    def test_configuredModel(self) -> None:
        """
        A configured model's own name, in any spelling, resolves to itself with its rule;
        the name to send stays as the client spelled it.
        """
        resolution = catalog().resolve("Llama3:8B")
        self.assertEqual(resolution.key, "llama3:8b")
        self.assertEqual(resolution.rule.name, "llama3:8b")
        self.assertFalse(resolution.aliased)
        self.assertEqual(resolution.model, "Llama3:8B")

    def test_unconfiguredModel(self) -> None:
        """
        Any other name resolves to itself without a rule.
        """
        self.assertEqual(
            catalog().resolve("hf.co/User/Repo:Q4_K_M"),
            Resolution("hf.co/User/Repo:Q4_K_M", "hf.co/user/repo:q4_k_m", None, False),
        )

    def test_aliases(self) -> None:
        """
        Every alias, as configured, maps to its model's canonical key.
        """
        self.assertEqual(
            catalog().aliases, {"gpt-4o-mini": "llama3:8b", "Fast": "llama3:8b"}
        )

    def test_collisions(self) -> None:
        """
        Names that only differ in spelling collide: two rules for one model, an alias
        given twice, or an alias naming a configured model are configuration errors.
        """
        cases = [
            {"Llama3": ModelRule("Llama3"), "llama3:latest": ModelRule("llama3:latest")},
            {
                "a:1": ModelRule("a:1", aliases=("x",)),
                "b:1": ModelRule("b:1", aliases=("X:latest",)),
            },
            {"a:1": ModelRule("a:1", aliases=("B:1",)), "b:1": ModelRule("b:1")},
        ]
        for rules in cases:
            self.assertRaises(ConfigError, ModelCatalog, rules)


class RewriteTests(SynchronousTestCase):
    """
    Tests for L{ModelCatalog.rewrite}.
    """

    def rewrite(self, body: dict, model: str | None = None, family: str = "ollama") -> dict:
        """
        Rewrite C{body} for its own model (or C{model}) and check it was not mutated.
        """
        c = catalog()
        before = repr(body)
        result = c.rewrite(body, c.resolve(model or body["model"]), family)
        self.assertEqual(repr(body), before, "input mutated")
        self.assertIsNot(result, body)
        return result

    def test_aliasRewritesModel(self) -> None:
        """
        A request for an alias goes out for the concrete model; nothing else is lost.
        """
        body = {"model": "GPT-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        result = self.rewrite(body, family="openai")
        self.assertEqual(result, {**body, "model": "llama3:8b"})
        self.assertIs(result["messages"], body["messages"])

    def test_nonAliasKeepsModel(self) -> None:
        """
        A configured model's own name is not rewritten (the HTTP layer spells it per
        backend).
        """
        result = self.rewrite({"model": "LLAMA3:8b"})
        self.assertEqual(result["model"], "LLAMA3:8b")

    def test_absentSet(self) -> None:
        """
        On Ollama routes, a missing (or null) C{keep_alive} and C{options.num_ctx} are
        set from the rule, other options kept.
        """
        self.assertEqual(
            self.rewrite({"model": "fast"}),
            {"model": "llama3:8b", "keep_alive": "30m", "options": {"num_ctx": 8192}},
        )
        self.assertEqual(
            self.rewrite(
                {"model": "llama3:8b", "keep_alive": None, "options": {"temperature": 0}}
            ),
            {
                "model": "llama3:8b",
                "keep_alive": "30m",
                "options": {"temperature": 0, "num_ctx": 8192},
            },
        )
        self.assertEqual(
            self.rewrite({"model": "llama3:8b", "options": None})["options"],
            {"num_ctx": 8192},
        )

    def test_presentKept(self) -> None:
        """
        A client's own C{keep_alive} and C{num_ctx} are kept when not enforced; the
        client's options dict is not mutated.
        """
        options = {"num_ctx": 2048, "seed": 1}
        result = self.rewrite({"model": "llama3:8b", "keep_alive": 0, "options": options})
        self.assertEqual(result["keep_alive"], 0)
        self.assertEqual(result["options"], {"num_ctx": 2048, "seed": 1})

    def test_enforcedOverridden(self) -> None:
        """
        Enforced options override the client's values.
        """
        options = {"num_ctx": 32768, "seed": 1}
        result = self.rewrite({"model": "qwen2.5:7b", "keep_alive": "5m", "options": options})
        self.assertEqual(result["keep_alive"], -1)
        self.assertEqual(result["options"], {"num_ctx": 4096, "seed": 1})
        self.assertEqual(options, {"num_ctx": 32768, "seed": 1})

    def test_badOptionsLeftAlone(self) -> None:
        """
        A non-object C{options} is passed on for the backend to reject.
        """
        result = self.rewrite({"model": "llama3:8b", "options": "big"})
        self.assertEqual(result["options"], "big")

    def test_openaiFamily(self) -> None:
        """
        On C{/v1} routes only the model name changes: Ollama's OpenAI layer ignores
        C{keep_alive} and C{options}, and other servers may reject them.
        """
        for family in ("openai", "anthropic"):
            self.assertEqual(
                self.rewrite({"model": "fast", "max_tokens": 5}, family=family),
                {"model": "llama3:8b", "max_tokens": 5},
            )
            self.assertEqual(
                self.rewrite({"model": "qwen2.5:7b"}, family=family), {"model": "qwen2.5:7b"}
            )

    def test_noRule(self) -> None:
        """
        A model without a rule is passed on unchanged (as a copy).
        """
        body = {"model": "mistral", "stream": False}
        self.assertEqual(self.rewrite(body), body)


class VersionKeyTests(SynchronousTestCase):
    """
    Tests for L{versionKey}.
    """

    def test_order(self) -> None:
        """
        Versions sort numerically, pre-releases before their release, junk lowest.
        """
        ascending = [
            "0.0.0",
            "v0.1",
            "0.1.32",
            "0.5.7-rc1",
            "0.5.7",
            "0.9.6",
            "0.10.0",
            "0.12.0-rc1",
            "0.12.0-rc2",
            "0.12.0-rc10",
            "0.12.0",
            "1.0.0",
        ]
        self.assertEqual(sorted(reversed(ascending), key=versionKey), ascending)
        for lower, higher in zip(ascending, ascending[1:]):
            self.assertLess(versionKey(lower), versionKey(higher), f"{lower} < {higher}")
        for junk in (None, "", "junk", "latest", "0.5 (beta)", "-1"):
            self.assertLess(versionKey(junk), versionKey("0.0.0"), repr(junk))

    def test_equal(self) -> None:
        """
        A leading C{v}, trailing zeros and build metadata do not change the order.
        """
        self.assertEqual(versionKey("v0.1"), versionKey("0.1.0"))
        self.assertEqual(versionKey("0.5.7+abc"), versionKey("0.5.7"))
        self.assertEqual(versionKey("junk"), versionKey("0.5 (beta)"))

    def test_min(self) -> None:
        """
        The lowest version of a list, as the aggregator picks it.
        """
        self.assertEqual(min(["0.10.0", "0.9.6", "0.12.0-rc1"], key=versionKey), "0.9.6")
        self.assertEqual(min(["0.12.0", "0.12.0-rc1"], key=versionKey), "0.12.0-rc1")
