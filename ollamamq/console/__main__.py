# -*- test-case-name: tests.test_console_app -*-
"""
C{python -m ollamamq.console}: the same as the C{ollamamq-console} script.
"""

import sys

from ollamamq.console.app import main

sys.exit(main())
