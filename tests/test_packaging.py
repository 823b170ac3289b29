"""
Tests of the packaging: what C{pip install .} ships is what the code imports.
"""

from __future__ import annotations

import configparser
import os
import pkgutil

from twisted.trial.unittest import SynchronousTestCase

import ollamamq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ollamamq.__file__)))


class PackagesTests(SynchronousTestCase):
    """
    setup.cfg lists every package of the source tree (a missing one installs a daemon
    that cannot import its own modules).
    """

    def test_everyPackageListed(self) -> None:
        """
        Each package below C{ollamamq/} is in C{[options] packages}.
        """
        setup = os.path.join(ROOT, "setup.cfg")
        if not os.path.exists(setup):
            raise self.skipTest("not run from a source checkout")
        parser = configparser.ConfigParser()
        parser.read(setup)
        listed = set(parser["options"]["packages"].split())
        found = {"ollamamq"} | {
            m.name for m in pkgutil.walk_packages([os.path.join(ROOT, "ollamamq")], "ollamamq.")
            if m.ispkg
        }
        self.assertEqual(found - listed, set())
