"""``cachingproxy-cache``: look into and tidy a cache directory.

Works on the directory directly, whether or not a proxy is using it: it opens
the index without the proxy's start-up sweep (``tmp/`` holds the downloads in
progress of a running proxy), keeps its transactions short, and deletes a row
before its body, as the proxy does.  A running proxy picks up the changes in
its usage figures within a few seconds.

Exit status: 0 on success, 1 when ``verify`` found bad bodies, 2 on errors.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import TextIO
from urllib.parse import urlsplit

from cachingproxy.cache.policy import BadURL, normalize_url
from cachingproxy.cache.store.index import Body, CacheDirError, Index
from cachingproxy.options import default_cache_dir

_PROG = "cachingproxy-cache"
_DAY = 86400.0
_HASH_CHUNK = 1024 * 1024
_TOP_HOSTS = 10

Command = Callable[[Index, argparse.Namespace, TextIO], int]


def _when(seconds: float | None) -> str:
    """``seconds`` since the epoch as an ISO 8601 UTC time, or ``-``."""
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _variant(variant: str) -> str:
    """A one-line summary of a variant key (``Accept=...; ...``), or ``-``."""
    return "; ".join(variant.splitlines()) or "-"


def _prefix(text: str) -> str:
    """``text`` with the scheme and host normalised as the proxy stores them.

    Only the origin is normalised (``HTTPS://Files.Example`` becomes
    ``https://files.example``); the rest is kept as typed, so a prefix never
    matches more than what it says.  Text that is not a URL is kept as is.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    try:
        origin = normalize_url(f"{scheme}://{rest[:end]}/")
    except BadURL:
        return text
    return origin[:-1] + rest[end:]


def _ls(index: Index, args: argparse.Namespace, out: TextIO) -> int:
    for entry, last_used in index.entries(_prefix(args.prefix)):
        fields = [entry.url, _variant(entry.variant), str(entry.status)]
        fields += [str(entry.size), _when(entry.stored_at), _when(last_used)]
        print("\t".join(fields), file=out)
    return 0


def _stats(index: Index, args: argparse.Namespace, out: TextIO) -> int:
    totals = index.totals()
    hosts: dict[str, list[int]] = {}
    for url, size in index.sizes():
        figures = hosts.setdefault(urlsplit(url).netloc, [0, 0])
        figures[0] += size
        figures[1] += 1
    print(f"cache:       {index.path}", file=out)
    print(f"entries:     {totals.entries}", file=out)
    print(f"bytes:       {totals.bytes} ({_size(totals.bytes)})", file=out)
    print(f"oldest:      {_when(totals.oldest_stored)}", file=out)
    print(f"newest:      {_when(totals.newest_stored)}", file=out)
    print(f"least used:  {_when(totals.least_recently_used)}", file=out)
    if hosts:
        print("top hosts by bytes:", file=out)
        ranked = sorted(hosts.items(), key=lambda item: (-item[1][0], item[0]))
        for host, (size, count) in ranked[:_TOP_HOSTS]:
            print(f"  {host}\t{size}\t({_size(size)})\t{count} entries", file=out)
    return 0


def _removed(out: TextIO, bodies: list[Body], index: Index, what: str = "") -> None:
    index.unlink_bodies(bodies)
    size = sum(body.size for body in bodies)
    print(f"removed {len(bodies)} entries ({size} bytes){what}", file=out)


def _purge(index: Index, args: argparse.Namespace, out: TextIO) -> int:
    if args.prefix:
        bodies = index.delete_prefix(_prefix(args.url))
    else:
        bodies = index.delete(normalize_url(args.url))
    _removed(out, bodies, index)
    return 0


def _cull(index: Index, args: argparse.Namespace, out: TextIO) -> int:
    cutoff = time.time() - args.older_than * _DAY
    bodies = index.delete_unused_since(cutoff)
    _removed(out, bodies, index, f" unused since {_when(cutoff)}")
    return 0


def _check(index: Index, body: Body, digest: str) -> str | None:
    """What is wrong with ``body``, or None if it hashes to ``digest``."""
    try:
        path = index.body_path(body.ref)
    except ValueError:
        return f"bad body reference {body.ref!r}"
    sha = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                sha.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return "missing body"
    except OSError as e:
        return f"unreadable body: {e.strerror}"
    if size != body.size:
        return f"body has {size} bytes, not {body.size}"
    if sha.hexdigest() != digest:
        return "sha256 mismatch"
    return None


def _verify(index: Index, args: argparse.Namespace, out: TextIO) -> int:
    rows = index.digests()
    bad = 0
    for url, variant, body, digest in rows:
        problem = _check(index, body, digest)
        if problem is None:
            continue
        # A running proxy may have replaced or dropped the entry meanwhile;
        # then there is nothing wrong with the index.
        dropped = index.delete_exact(url, variant, body.ref)
        if dropped:
            index.unlink_bodies(dropped)
            where = url if not variant else f"{url} [{_variant(variant)}]"
            print(f"{problem}: {where} (dropped)", file=out)
            bad += 1
    print(f"verified {len(rows)} entries: {bad} bad", file=out)
    return 1 if bad else 0


def _ca_cert(cache_dir: str, out: TextIO) -> int:
    """Print the CA certificate the proxy generated into ``cache_dir``."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from cachingproxy.tls.ca import CA_CERT_FILE

    path = os.path.join(cache_dir, CA_CERT_FILE)
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificates(f.read())[0]
    except FileNotFoundError:
        return _fail(
            f"no CA in {cache_dir} yet: the proxy generates {CA_CERT_FILE} there"
            " when it first runs with --intercept and no --ca-cert"
        )
    except OSError as e:
        return _fail(f"cannot read {path}: {e.strerror}")
    except ValueError:
        return _fail(f"{path} holds no PEM certificate")
    out.write(cert.public_bytes(Encoding.PEM).decode("ascii"))
    out.flush()
    return 0


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Look into and tidy the cache of cachingproxy,"
        " whether or not the proxy is running.",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="PATH",
        default=default_cache_dir(),
        help="the cache directory (default: %(default)s)",
    )
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def command(name: str, run: Command, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    ls = command("ls", _ls, "list entries: URL, variant, status, size, stored, used")
    ls.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    command("stats", _stats, "entries, bytes, age range and top hosts")
    purge = command("purge", _purge, "drop every variant of URL")
    purge.add_argument("--prefix", action="store_true", help="drop URLs starting so")
    purge.add_argument("url", metavar="URL")
    command("verify", _verify, "re-hash every body; report and drop bad ones")
    cull = command("cull", _cull, "drop entries not used for some days")
    cull.add_argument("--older-than", type=_days, required=True, metavar="DAYS")
    # Needs no index: set_defaults(run=None) makes main() skip opening it.
    summary = "print the PEM certificate of the interception CA for clients to trust"
    commands.add_parser("ca-cert", help=summary, description=summary).set_defaults(
        run=None
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cachingproxy-cache`` with ``argv`` (default: the command line)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    out = sys.stdout
    if args.run is None:
        return _ca_cert(args.cache_dir, out)
    try:
        index = Index.open(args.cache_dir, create=False)
    except (CacheDirError, OSError) as e:
        return _fail(str(e))
    try:
        status: int = args.run(index, args, out)
        out.flush()
        return status
    except BadURL as e:
        return _fail(str(e))
    except sqlite3.Error as e:
        return _fail(f"{args.cache_dir}: index error: {e}")
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return 1
    except OSError as e:
        return _fail(f"{args.cache_dir}: {e}")
    except KeyboardInterrupt:
        return 130
    finally:
        index.close()


def _fail(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
