# -*- test-case-name: tests.test_console_app -*-
"""
C{python -m ollamamq.console}: the same as the C{ollamamq-console} script.
"""

import sys

from ollamamq.console.app import main

# Guarded: importing the package's modules (as tests and tools do) must not start it.
if __name__ == "__main__":
    sys.exit(main())
