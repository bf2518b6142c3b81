"""``./run`` and ``.ci/run``: set-up in two commands (SPEC 1).

The virtualenv step is what a fresh clone exercises (and ``.ci/run`` does on
every CI run); here a scratch virtualenv directory whose install stamp is
current stands in for it, so what is checked is what ``./run`` then starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from .support import REPO_ROOT, need, no_proxy_env, run, run_process

RUN = os.path.join(REPO_ROOT, "run")


def _stamp_suffix() -> str:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        done = subprocess.run(["cksum"], stdin=f, capture_output=True, check=True)
    return done.stdout.split()[0].decode()


class RunScriptTests(TestCase):
    """What ``./run`` starts, and what it refuses."""

    def _venv(self, extras: str) -> str:
        """A virtualenv directory whose stamp says ``extras`` are installed,
        with a ``twistd`` that prints how it was started and a ``python``
        that refuses to run (nothing may be installed, and never into a real
        interpreter)."""
        venv = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(venv, "bin"))
        for name, script in (
            ("twistd", 'echo "args: $*"\necho "pythonpath: $PYTHONPATH"'),
            ("python", 'echo "python run: $*" >&2\nexit 3'),
        ):
            path = os.path.join(venv, "bin", name)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\n{script}\n")
            os.chmod(path, 0o755)
        stamp = f".cachingproxy-editable-{_stamp_suffix()}-{extras}"
        with open(os.path.join(venv, stamp), "w"):
            pass
        return venv

    def test_runs_the_proxy(self) -> defer.Deferred[None]:
        """``./run OPTIONS`` with an up-to-date virtualenv installs nothing
        (``INSTALL`` is set: ``.ci/run`` exports ``INSTALL=wheel``, and the
        stand-in virtualenv's python is the base interpreter, which must
        never be installed into)
        and starts ``twistd -n --pidfile= cachingproxy OPTIONS`` with the
        checkout first on PYTHONPATH (its twistd dropin); a virtualenv made
        for the tests serves too."""

        async def check() -> None:
            for extras in ("run", "test"):
                venv = self._venv(extras)
                result = await run_process(
                    [RUN, "--listen", "tcp:3999"],
                    env=no_proxy_env(
                        VENV=venv,
                        PYTHONPATH="/elsewhere",
                        PYTHON=sys.executable,
                        INSTALL="editable",
                    ),
                )
                self.assertEqual(result.code, 0, result.output)
                self.assertNotIn("installing", result.output)
                self.assertNotIn("python run", result.output)
                lines = result.out.decode().splitlines()
                self.assertEqual(
                    lines[0], "args: -n --pidfile= cachingproxy --listen tcp:3999"
                )
                self.assertEqual(lines[1], f"pythonpath: {REPO_ROOT}:/elsewhere")

        return run(check())

    def test_old_python_refused(self) -> defer.Deferred[None]:
        """A Python older than 3.11 (or none) stops ``./run`` before anything
        is made, with exit status 2 and a line saying why."""

        async def check() -> None:
            venv = os.path.abspath(self.mktemp())
            result = await run_process(
                [RUN, "test"],
                env=no_proxy_env(VENV=venv, PYTHON="/bin/false", INSTALL="editable"),
            )
            self.assertEqual(result.code, 2, result.output)
            self.assertIn("needs Python >= 3.11", result.output)
            self.assertFalse(os.path.exists(venv))

        return run(check())

    def test_shellcheck(self) -> defer.Deferred[None]:
        """shellcheck finds nothing in ``run`` and ``.ci/run``."""

        async def check() -> None:
            need("shellcheck")
            ci = os.path.join(REPO_ROOT, ".ci", "run")
            result = await run_process([shutil.which("shellcheck") or "", RUN, ci])
            self.assertEqual(result.code, 0, result.output)

        return run(check())
