# -*- test-case-name: tests.test_web -*-
"""
Loads the status page shipped in this package.
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def statusPage() -> bytes:
    """
    The bytes of C{index.html} (read once: the file is part of the installed package).
    """
    return resources.files("ollamamq.web").joinpath("index.html").read_bytes()
