# -*- test-case-name: tests.test_models -*-
"""
Model names: how a requested name matches a backend's model, aliases, and per-model
request rewriting.

Three layers, from the outside in:

  - L{canonicalModel} turns any spelling of a model name into the key the pool routes by
    (case-insensitive, C{:latest} implied, Ollama's default registry and namespace
    dropped), so matching is a dictionary lookup.
  - L{ModelCatalog.resolve} applies the configured aliases (C{[models."x"] aliases}) and
    finds the L{ModelRule} of the requested model.
  - L{ModelCatalog.rewrite} applies that rule to the request body: the concrete model name
    for an alias, and C{keep_alive} / C{options.num_ctx} on Ollama's native routes.

Spelling a key the way one backend lists it (C{Llama3:8B}) is the HTTP layer's job, with
L{ollamamq.backends.Backend.modelName}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from ollamamq.config import ConfigError, ModelRule

OLLAMA_FAMILY = "ollama"

# Ollama displays "registry.ollama.ai/library/llama3:latest" as "llama3:latest" (its
# DisplayShortest drops the default host, then the default namespace), and accepts any of
# the long forms in a request, so they must all share one key.
_DEFAULT_PREFIXES = ("registry.ollama.ai/", "library/")


def canonicalModel(name: str) -> str:
    """
    The key two model names share exactly when they name the same model.

    Matching is case-insensitive and a name without a tag means C{:latest}, as in Ollama;
    two different explicit tags never match (C{llama3:8b} is not C{llama3:70b}, and
    C{llama3} is C{llama3:latest}, not C{llama3:8b}). Ollama's default registry and
    namespace are implied too: C{library/llama3} and C{registry.ollama.ai/library/llama3}
    are C{llama3}. Other namespaces stay (C{hf.co/user/repo:Q4_K_M}); a host with a port
    is not mistaken for a tag, because only the last path segment can carry one.
    """
    key = name.strip().lower()
    for prefix in _DEFAULT_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix) :]
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key


@attrs.frozen
class Resolution:
    """
    What a requested model name resolved to.

    @ivar requested: the name as the client sent it.
    @ivar key: the canonical key requests are routed by (see L{canonicalModel}); for an
        alias, the key of the model it stands for.
    @ivar rule: the configured rule of that model, or L{None}.
    @ivar aliased: whether C{requested} was an alias, so the body's model must change.
    """

    requested: str
    key: str
    rule: ModelRule | None = None
    aliased: bool = False

    @property
    def model(self) -> str:
        """
        The concrete model name to send upstream (before per-backend spelling).
        """
        if self.aliased and self.rule is not None:
            return self.rule.name
        return self.requested


class ModelCatalog:
    """
    The configured models: aliases, and the rules that rewrite requests for them.

    Built once from C{config.models}; read-only afterwards, so lookups need no locking and
    cost two dictionary probes.
    """

    def __init__(self, rules: Mapping[str, ModelRule]) -> None:
        """
        @param rules: C{config.models}, configured model name -> its rule.
        @raise ConfigError: when two rules, or two aliases, name the same model once
            canonicalised (C{Llama3} and C{llama3:latest}), or an alias hides a configured
            model; config validation compares lower-cased strings only, which misses these.
        """
        self._rules: dict[str, ModelRule] = {}
        self._aliases: dict[str, ModelRule] = {}
        self._aliasNames: dict[str, list[str]] = {}
        for rule in rules.values():
            key = canonicalModel(rule.name)
            if key in self._rules:
                raise ConfigError(
                    f"models.{rule.name!r}: same model as {self._rules[key].name!r}"
                )
            self._rules[key] = rule
            self._aliasNames[key] = list(rule.aliases)
        for rule in rules.values():
            for alias in rule.aliases:
                aliasKey = canonicalModel(alias)
                if aliasKey in self._rules:
                    raise ConfigError(
                        f"models.{rule.name!r}.aliases: {alias!r} is a configured model"
                    )
                if aliasKey in self._aliases:
                    raise ConfigError(
                        f"models.{rule.name!r}.aliases: {alias!r} is already an alias of "
                        f"{self._aliases[aliasKey].name!r}"
                    )
                self._aliases[aliasKey] = rule

    @property
    def aliases(self) -> dict[str, str]:
        """
        Every alias as configured -> the canonical key of the model it stands for.
        """
        return {
            alias: key for key, names in self._aliasNames.items() for alias in names
        }

    def resolve(self, requested: str) -> Resolution:
        """
        Resolve a requested model name.

        An alias matches like a model name does (case-insensitive; an untagged alias also
        matches C{alias:latest}) and resolves to its rule's model. Any other name resolves
        to itself, with the rule configured for it, if any.
        """
        key = canonicalModel(requested)
        rule = self._aliases.get(key)
        if rule is not None:
            return Resolution(requested, canonicalModel(rule.name), rule, True)
        return Resolution(requested, key, self._rules.get(key))

    def rewrite(self, body: dict, resolution: Resolution, family: str) -> dict:
        """
        The request body to send upstream for C{resolution}.

        Returns a new dict and never mutates C{body} (nor its C{options}); values other
        than C{model} and C{options} are shared with C{body}.

          - C{model} becomes the concrete model name when an alias was used.
          - Family C{"ollama"} (C{/api/generate}, C{/api/chat}, C{/api/embed},
            C{/api/embeddings}): C{keep_alive} and C{options.num_ctx} are set from the
            rule when the client sent none (absent or C{null}), and override the
            client's value when listed in the rule's C{enforce}.
          - Any other family (C{"openai"} for C{/v1/*}, C{"anthropic"}): only the model
            name. Ollama's OpenAI layer cannot take them: its C{ChatCompletionRequest} and
            C{CompletionRequest} (C{openai/openai.go}) have no C{keep_alive} and no
            C{options} field, C{FromChatRequest} builds C{options} only from the OpenAI
            fields (temperature, top_p, max_tokens -> num_predict, stop, seed,
            penalties) and never sets C{KeepAlive}, and Go's JSON decoding drops unknown
            fields. So injected values would be silently ignored by Ollama, and other
            OpenAI-compatible servers may reject unknown fields outright. To give C{/v1}
            traffic the same context size, set C{OLLAMA_CONTEXT_LENGTH} (and
            C{OLLAMA_KEEP_ALIVE}) on the Ollama server, or bake C{PARAMETER num_ctx} into
            a Modelfile; otherwise C{/api} requests with C{num_ctx} and C{/v1} requests
            without it make Ollama reload the model each time they alternate.
        """
        result = dict(body)
        if resolution.aliased:
            result["model"] = resolution.model
        rule = resolution.rule
        if rule is None or family != OLLAMA_FAMILY:
            return result
        if rule.keepAlive is not None and (
            result.get("keep_alive") is None or "keep_alive" in rule.enforce
        ):
            result["keep_alive"] = rule.keepAlive
        if rule.numCtx is not None:
            options = result.get("options")
            if options is None:
                result["options"] = {"num_ctx": rule.numCtx}
            elif isinstance(options, dict) and (
                options.get("num_ctx") is None or "num_ctx" in rule.enforce
            ):
                # A client's non-object "options" is left for the backend to reject with
                # its own 400; guessing what it meant would be worse.
                result["options"] = {**options, "num_ctx": rule.numCtx}
        return result


_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)(?:[-.]?([0-9a-z.\-]*))?(?:\+.*)?", re.IGNORECASE)
_TOKEN = re.compile(r"\d+|[a-z]+", re.IGNORECASE)


def versionKey(version: str | None) -> tuple:
    """
    A sort key that orders version strings as versions: C{0.10.0} > C{0.9.6}, C{v0.1} ==
    C{0.1.0}, a pre-release before its release (C{0.12.0-rc1} < C{0.12.0}), C{rc2} <
    C{rc10}, build metadata (C{+abc}) ignored. Anything unparsable (junk, empty, L{None})
    sorts below every real version.
    """
    match = _VERSION.fullmatch(version.strip()) if isinstance(version, str) else None
    if match is None:
        return (0,)
    numbers = [int(n) for n in match.group(1).split(".")]
    # Trailing zeros carry no order: "0.1" and "0.1.0" are the same release.
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    suffix = match.group(2)
    if not suffix:
        return (1, tuple(numbers), (1,))
    # Natural order inside the pre-release part; numbers before words, as in SemVer.
    tokens = tuple(
        (0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in _TOKEN.findall(suffix)
    )
    return (1, tuple(numbers), (0, tokens))
