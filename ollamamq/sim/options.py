# -*- test-case-name: tests.test_sim -*-
"""
How a simulated backend behaves: L{SimulatorOptions}, validated so that a bad value gets a
message fit for a command-line user.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import attrs

__all__ = ["API_FAMILIES", "LLAMA_SERVER", "OLLAMA", "OPENAI", "SimulatorOptions"]

OLLAMA = "ollama"
OPENAI = "openai"
LLAMA_SERVER = "llama-server"

API_FAMILIES = (OLLAMA, OPENAI, LLAMA_SERVER)
"""
What C{--api} may name: the server a simulator imitates.
"""


def _positive(name: str) -> Callable[[Any, Any, Any], None]:
    """
    Build an attrs validator that requires a finite number of at least 1.

    @param name: the option's name, for the error message.
    @return: the validator.
    """

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, not {value!r}")

    return check


def _nonNegative(name: str) -> Callable[[Any, Any, Any], None]:
    """
    Build an attrs validator that requires a finite number that is not
    negative.

    @param name: the option's name, for the error message.
    @return: the validator.
    """

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name} must be a finite number of at least 0, not {value!r}")

    return check


def _modelsConverter(value: str | Iterable[str]) -> tuple[str, ...]:
    """
    Accept model names as a tuple, any iterable, or one comma-separated string.

    @param value: the names.
    @return: the names, stripped, empty ones dropped.
    """
    if isinstance(value, str):
        value = value.split(",")
    return tuple(name.strip() for name in value if name.strip())


def _checkModels(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    """
    Require at least one model name.

    @param instance: the options being built.
    @param attribute: the attrs attribute.
    @param value: the converted model names.
    """
    if not value:
        raise ValueError("models must name at least one model")


def _checkApi(instance: Any, attribute: Any, value: str) -> None:
    """
    Require a known API family.

    @param instance: the options being built.
    @param attribute: the attrs attribute.
    @param value: the family name.
    """
    if value not in API_FAMILIES:
        raise ValueError(f"api must be one of {', '.join(API_FAMILIES)}, not {value!r}")


@attrs.frozen
class SimulatorOptions:
    """
    How a L{ollamamq.sim.resource.Simulator} behaves.  Invalid values raise
    L{ValueError} with a message fit for a command-line user.

    @ivar api: C{"ollama"} serves C{/api/*} and C{/v1/*} like real Ollama;
        C{"openai"} serves only C{/v1/*} (like vLLM); C{"llama-server"} serves
        C{/v1/*} plus llama.cpp's C{/health} (503 C{"Loading model"} while its
        models load at startup, for C{loadDelay} seconds) and C{/props} (with
        C{total_slots}).
    @ivar models: the model names served.  With the Ollama API a name without
        a tag means C{:latest}, as in Ollama.  Names containing C{embed} are
        embedding-only models that refuse to generate, as in Ollama.
    @ivar tps: tokens per second per stream; C{0} means as fast as the
        reactor turns (one token per turn).
    @ivar tokens: default answer length; C{options.num_predict} (Ollama) or
        C{max_tokens}/C{max_completion_tokens} (OpenAI) override it; an
        Anthropic C{max_tokens} caps it.
    @ivar loadDelay: seconds to load a model that is not loaded.
    @ivar slots: how many generations or embeddings run at once.
    @ivar maxLoaded: how many models stay loaded (least recently used goes).
    @ivar messages: whether the Anthropic Messages routes (C{/v1/messages},
        C{/v1/messages/count_tokens}) are served, as Ollama, llama-server and
        vLLM do natively; off imitates a server without them.
    @ivar version: reported by C{/api/version}.
    @ivar name: reported in the C{X-Sim-Backend} header of every response.
    """

    api: str = attrs.field(default=OLLAMA, validator=_checkApi)
    models: tuple[str, ...] = attrs.field(
        default=("llama3:latest",), converter=_modelsConverter, validator=_checkModels
    )
    tps: float = attrs.field(default=50.0, validator=_nonNegative("tps"))
    tokens: int = attrs.field(default=20, validator=_nonNegative("tokens"))
    loadDelay: float = attrs.field(default=0.0, validator=_nonNegative("loadDelay"))
    slots: int = attrs.field(default=1, validator=_positive("slots"))
    maxLoaded: int = attrs.field(default=1, validator=_positive("maxLoaded"))
    messages: bool = True
    version: str = "0.12.6"
    name: str = "sim"
