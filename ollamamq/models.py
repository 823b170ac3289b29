# -*- test-case-name: tests.test_models -*-
"""
Model names: how a requested name matches a backend's model, aliases, and per-model
request rewriting.
"""

from __future__ import annotations


def canonicalModel(name: str) -> str:
    """
    The key two model names share exactly when they name the same model.

    Matching is case-insensitive and a name without a tag means C{:latest}, as in Ollama;
    two different explicit tags never match (C{llama3:8b} is not C{llama3:70b}).
    """
    key = name.strip().lower()
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key
