"""The claims directory in memory (cachingproxy/workers/ramdir.py)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cachingproxy.workers import ramdir
from cachingproxy.workers.claims import Claims


class RamDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = self.mktemp()
        os.makedirs(os.path.join(self.cache, "run"))
        self.path = os.path.join(self.cache, "run", "claims")
        self.root = self.mktemp()  # stands for /dev/shm
        os.makedirs(self.root)

    def test_link_to_private_directory(self) -> None:
        """``run/claims`` becomes a link to a new 0700 directory under the
        RAM root; claims taken through the link live there."""
        target = ramdir.make(self.path, self.root)
        self.assertTrue(os.path.islink(self.path))
        self.assertEqual(os.path.dirname(target), os.path.abspath(self.root))
        self.assertTrue(os.path.basename(target).startswith(ramdir.PREFIX))
        self.assertEqual(os.stat(target).st_mode & 0o777, 0o700)
        claims = Claims(self.path, lambda: 0.0)
        claim = claims.acquire("http://x.test/a")
        assert claim is not None
        self.assertIsNone(claims.acquire("http://x.test/a"))
        self.assertEqual(len(os.listdir(target)), 2)  # lock and state
        claim.release(state="done", size=1)

    def test_remake_and_remove(self) -> None:
        """Making it again (a supervisor restart, or one after a SIGKILL)
        removes the previous directory; remove() takes link and directory."""
        first = ramdir.make(self.path, self.root)
        with open(os.path.join(first, "left.json"), "wb"):
            pass
        second = ramdir.make(self.path, self.root)
        self.assertNotEqual(first, second)
        self.assertFalse(os.path.exists(first))
        self.assertEqual(os.listdir(second), [])
        ramdir.remove(self.path, self.root)
        self.assertFalse(os.path.lexists(self.path))
        self.assertEqual(os.listdir(self.root), [])

    def test_without_ram_root(self) -> None:
        """No RAM file system: a plain directory, emptied when made again."""
        missing = os.path.join(self.root, "absent")
        self.assertEqual(ramdir.make(self.path, missing), self.path)
        self.assertTrue(os.path.isdir(self.path))
        self.assertFalse(os.path.islink(self.path))
        with open(os.path.join(self.path, "old.json"), "wb"):
            pass
        ramdir.make(self.path, missing)
        self.assertEqual(os.listdir(self.path), [])

    def test_foreign_link_target_kept(self) -> None:
        """A link to anything else is removed, not what it points to."""
        elsewhere = self.mktemp()
        os.makedirs(elsewhere)
        with open(os.path.join(elsewhere, "keep"), "wb"):
            pass
        os.symlink(os.path.abspath(elsewhere), self.path)
        ramdir.make(self.path, self.root)
        self.assertEqual(os.listdir(elsewhere), ["keep"])
        self.assertTrue(os.path.islink(self.path))
