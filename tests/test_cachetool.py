"""Tests for the ``cachingproxy-cache`` tool (cachingproxy.ops.cachetool)."""

from __future__ import annotations

import io
import os
import sqlite3
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

from twisted.internet import task
from twisted.trial import unittest

from cachingproxy.cache.entry import StoredResponse
from cachingproxy.cache.store import DiskStore
from cachingproxy.cache.store.disk import FLUSH_INTERVAL
from cachingproxy.ops.cachetool import main

from .support import checkout_env, run_process
from .test_store import ClockReactor, make_entry

DAY = 86400.0
NOW = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A = "https://files.example/a-1.0.tar.gz"
B = "https://files.example/b-2.0.whl"
C = "https://other.example/c.json"


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class CacheToolTests(unittest.TestCase):
    """The cache tool's commands on a cache a DiskStore wrote."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = task.Clock()

    def open_store(self, at: float = NOW) -> DiskStore:
        """A store on the cache whose clock reads ``at``."""
        self.clock.advance(at - self.clock.seconds())
        store = DiskStore.open(self.path, ClockReactor(self.clock))
        self.addCleanup(store.close)
        return store

    async def put(
        self, store: DiskStore, url: str, body: bytes, variant: str = ""
    ) -> StoredResponse:
        writer = await store.open_writer(url)
        writer.write(body)
        stored_at = self.clock.seconds() - 60
        return await writer.commit(make_entry(url, variant, stored_at=stored_at))

    async def populate(self) -> list[StoredResponse]:
        """A (4 bytes), B in two variants (5 + 6 bytes) and C (7 bytes)."""
        store = self.open_store()
        entries = [
            await self.put(store, A, b"aaaa"),
            await self.put(store, B, b"bbbbb", "Accept=text/html"),
            await self.put(store, B, b"BBBBBB", "Accept=application/json"),
            await self.put(store, C, b"ccccccc"),
        ]
        await store.close()
        return entries

    def tool(self, *args: str) -> tuple[int, str, str]:
        """Run the tool in-process on the test's cache: status, stdout, stderr."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = main(["--cache-dir", self.path, *args])
        return status, out.getvalue(), err.getvalue()

    def body_path(self, entry: StoredResponse) -> str:
        return os.path.join(self.path, "bodies", entry.body_ref)

    def bodies(self) -> list[str]:
        top = os.path.join(self.path, "bodies")
        return sorted(
            os.path.relpath(os.path.join(d, f), top)
            for d, _, names in os.walk(top)
            for f in names
        )

    def urls(self) -> list[str]:
        """The first column of ``ls``."""
        status, out, _ = self.tool("ls")
        self.assertEqual(status, 0)
        return [line.split("\t")[0] for line in out.splitlines()]

    async def test_ls(self) -> None:
        """ls prints one line per entry, by URL: URL, variant, status, size,
        stored and last-used times; a prefix (origin normalised) filters."""
        await self.populate()
        status, out, err = self.tool("ls")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], f"{A}\t-\t200\t4\t{iso(NOW - 60)}\t{iso(NOW)}")
        self.assertEqual(
            [line.split("\t")[:4] for line in lines],
            [
                [A, "-", "200", "4"],
                [B, "Accept=application/json", "200", "6"],
                [B, "Accept=text/html", "200", "5"],
                [C, "-", "200", "7"],
            ],
        )
        status, out, _ = self.tool("ls", "HTTPS://Files.Example:443/b-")
        self.assertEqual(
            [line.split("\t")[1] for line in out.splitlines()],
            ["Accept=application/json", "Accept=text/html"],
        )
        self.assertEqual(self.tool("ls", "https://nothing.example/"), (0, "", ""))

    async def test_stats(self) -> None:
        """stats reports entries, bytes, the stored-time range and hosts by bytes."""
        await self.populate()
        status, out, err = self.tool("stats")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("entries:     4\n", out)
        self.assertIn("bytes:       22 (22 B)\n", out)
        self.assertIn(f"oldest:      {iso(NOW - 60)}\n", out)
        self.assertIn(f"least used:  {iso(NOW)}\n", out)
        hosts = out.split("top hosts by bytes:\n")[1].splitlines()
        self.assertEqual(
            [line.split("\t") for line in hosts],
            [
                ["  files.example", "15", "(15 B)", "3 entries"],
                ["  other.example", "7", "(7 B)", "1 entries"],
            ],
        )

    async def test_stats_empty(self) -> None:
        """stats on an empty cache reports zeros and no times."""
        await self.open_store().close()
        status, out, _ = self.tool("stats")
        self.assertEqual(status, 0)
        self.assertIn("entries:     0\n", out)
        self.assertIn("oldest:      -\n", out)
        self.assertNotIn("top hosts", out)

    async def test_purge_url(self) -> None:
        """purge URL drops every variant of the normalised URL and their bodies."""
        a, _, _, c = await self.populate()
        status, out, err = self.tool("purge", "HTTPS://FILES.example:443/b-2.0.whl")
        self.assertEqual((status, out, err), (0, "removed 2 entries (11 bytes)\n", ""))
        self.assertEqual(self.urls(), [A, C])
        self.assertEqual(self.bodies(), sorted([a.body_ref, c.body_ref]))
        self.assertEqual(self.tool("purge", B)[1], "removed 0 entries (0 bytes)\n")

    async def test_purge_prefix(self) -> None:
        """purge --prefix drops every entry whose URL starts with the prefix."""
        *_, c = await self.populate()
        status, out, _ = self.tool("purge", "--prefix", "https://FILES.example/")
        self.assertEqual((status, out), (0, "removed 3 entries (15 bytes)\n"))
        self.assertEqual(self.urls(), [C])
        self.assertEqual(self.bodies(), [c.body_ref])

    async def test_purge_bad_url(self) -> None:
        """A URL the proxy could not have stored is a one-line error, status 2."""
        await self.populate()
        status, out, err = self.tool("purge", "ftp://files.example/x")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(
            err,
            "cachingproxy-cache: error: unsupported scheme in 'ftp://files.example/x'\n",
        )

    async def test_verify(self) -> None:
        """verify reports and drops entries whose body is corrupt, short or
        missing, exits 1, and a second run finds nothing and exits 0."""
        a, b1, b2, c = await self.populate()
        with open(self.body_path(a), "r+b") as f:
            f.seek(2)
            f.write(bytes([f.read(1)[0] ^ 0x01]))
        os.truncate(self.body_path(b1), 3)
        os.unlink(self.body_path(c))
        status, out, err = self.tool("verify")
        self.assertEqual((status, err), (1, ""))
        self.assertEqual(
            out.splitlines(),
            [
                f"sha256 mismatch: {A} (dropped)",
                f"body has 3 bytes, not 5: {B} [Accept=text/html] (dropped)",
                f"missing body: {C} (dropped)",
                "verified 4 entries: 3 bad",
            ],
        )
        self.assertEqual(self.urls(), [B])
        self.assertEqual(self.bodies(), [b2.body_ref])
        self.assertEqual(self.tool("verify"), (0, "verified 1 entries: 0 bad\n", ""))

    async def test_cull(self) -> None:
        """cull --older-than drops the entries not used for that long, whenever
        they were stored, and keeps the others."""
        store = self.open_store(at=NOW - 40 * DAY)
        old = await self.put(store, A, b"old")
        used = await self.put(store, B, b"used lately")
        self.clock.advance(38 * DAY)
        store.touch(used)
        self.clock.advance(2 * DAY)
        await self.put(store, C, b"new")
        await store.close()
        status, out, err = self.tool("cull", "--older-than", "30")
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.startswith("removed 1 entries (3 bytes) unused since "))
        self.assertEqual(self.urls(), [B, C])
        self.assertFalse(os.path.exists(self.body_path(old)))
        self.assertEqual(
            self.tool("cull", "--older-than", "1.5")[1][:17], "removed 1 entries"
        )
        self.assertEqual(self.urls(), [C])

    async def test_alongside_the_proxy(self) -> None:
        """With a store open (the proxy running), the tool leaves tmp/ alone,
        the store sees its deletions, and its usage catches up at the next
        flush."""
        store = self.open_store()
        await self.put(store, A, b"aaaa")
        await self.put(store, B, b"bbbbb")
        writer = await store.open_writer(C)
        writer.write(b"in progress")
        [temp] = os.listdir(os.path.join(self.path, "tmp"))
        self.assertEqual(
            self.tool("purge", A)[:2], (0, "removed 1 entries (4 bytes)\n")
        )
        self.assertEqual(self.tool("verify")[0], 0)
        self.assertEqual(os.listdir(os.path.join(self.path, "tmp")), [temp])
        self.assertEqual(await store.lookup(A), [])
        await writer.commit(make_entry(C))
        self.assertEqual(self.urls(), [B, C])
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual((store.usage().entries, store.usage().bytes), (2, 16))

    def test_missing_dir(self) -> None:
        """A missing cache dir, or one without an index, is a one-line error
        (status 2) and nothing is created."""
        for command in (["ls"], ["stats"], ["verify"], ["purge", A]):
            self.assertEqual(
                self.tool(*command),
                (2, "", f"cachingproxy-cache: error: no cache in {self.path}\n"),
            )
        self.assertFalse(os.path.exists(self.path))
        os.makedirs(self.path)
        self.assertEqual(self.tool("stats")[0], 2)
        self.assertEqual(os.listdir(self.path), [])

    def test_foreign_dir(self) -> None:
        """A directory holding other files, or an index that is not ours, is
        refused with a one-line error (status 2) and left as it was."""
        os.makedirs(self.path)
        with open(os.path.join(self.path, "notes.txt"), "w") as f:
            f.write("mine")
        status, out, err = self.tool("ls")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(
            err,
            f"cachingproxy-cache: error: {self.path} holds 'notes.txt'"
            " but no cache index\n",
        )
        index = os.path.join(self.path, "index.sqlite")
        db = sqlite3.connect(index)
        db.execute("CREATE TABLE other (x)")
        db.commit()
        db.close()
        status, _, err = self.tool("ls")
        self.assertEqual(status, 2)
        self.assertRegex(
            err, r"\Acachingproxy-cache: error: .* is not a cachingproxy index\n\Z"
        )
        with open(index, "wb") as f:
            f.write(b"not a database at all" * 100)
        status, _, err = self.tool("stats")
        self.assertEqual(status, 2)
        self.assertRegex(
            err, r"\Acachingproxy-cache: error: .* is not a usable index: "
        )
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(sorted(os.listdir(self.path)), ["index.sqlite", "notes.txt"])

    def test_usage_errors(self) -> None:
        """Bad arguments are argparse usage errors (status 2); --help is 0."""
        for args in ([], ["cull"], ["cull", "--older-than", "soon"], ["purge"]):
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                self.assertEqual(main(args), 2)
            self.assertIn("usage: cachingproxy-cache", err.getvalue())
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(main(["--help"]), 0)
        for command in ("ls", "stats", "purge", "verify", "cull"):
            self.assertIn(command, out.getvalue())

    async def test_subprocess(self) -> None:
        """``python -m cachingproxy.ops.cachetool`` runs the tool with its exit status."""
        await self.populate()
        args = [sys.executable, "-m", "cachingproxy.ops.cachetool"]
        args += ["--cache-dir", self.path]
        result = await run_process(
            [*args, "ls", "https://other.example/"], env=checkout_env()
        )
        self.assertEqual((result.code, result.err), (0, b""))
        self.assertEqual(result.out.decode().split("\t")[0], C)
        missing = self.path + "-missing"
        result = await run_process([*args[:4], missing, "verify"], env=checkout_env())
        self.assertEqual((result.code, result.out), (2, b""))
        self.assertEqual(
            result.err.decode(), f"cachingproxy-cache: error: no cache in {missing}\n"
        )
