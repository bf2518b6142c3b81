"""Proxy authentication (``--proxy-auth FILE``): ``Proxy-Authorization: Basic``
checked against an htpasswd file of bcrypt or SHA entries.

bcrypt is slow on purpose, so it never runs in the reactor thread: it runs
in a small thread pool of its own (DNS lookups keep the reactor's), the same
credentials checked at the same time share one run, and a success is
remembered (keyed by user, stored hash and a keyed digest of the password,
bounded) so that the hot path does no bcrypt at all.  The file is re-read
when it changes, looked at (one ``stat``) at most once a second.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import re
from collections import OrderedDict
from typing import Any

import bcrypt
from attrs import frozen
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Request

from cachingproxy.front.limits import RateLimitedLog, held_back
from cachingproxy.front.responses import client_gone, set_head

_log = Logger()

REALM = "cachingproxy"
CHALLENGE = f'Basic realm="{REALM}"'
"""The ``Proxy-Authenticate`` value of a 407."""

_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_BCRYPT_MAX = 72
"""bcrypt uses the first 72 bytes of a password (htpasswd -B does the same)."""

RELOAD_INTERVAL = 1.0
"""Seconds between two looks (``stat``) at the file for changes."""


class HtpasswdError(ValueError):
    """The htpasswd file cannot be used; the message says where and why."""


class Scheme(enum.Enum):
    BCRYPT = "bcrypt"
    SHA = "sha"


@frozen
class Entry:
    """One user of the htpasswd file."""

    user: str
    scheme: Scheme
    hashed: bytes
    """The bcrypt hash as written, or the 20-byte SHA-1 digest."""


def parse_htpasswd(text: str) -> dict[str, Entry]:
    """The users of an htpasswd file: ``user:$2y$…`` (bcrypt, also ``$2a$``,
    ``$2b$``) or ``user:{SHA}base64`` lines; blank lines and ``#`` comments
    are skipped.

    @raise HtpasswdError: a line that is not ``USER:HASH``, a hash of another
        kind (MD5 ``$apr1$``, crypt, plain text), a user given twice, or no
        user at all.
    """
    users: dict[str, Entry] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise HtpasswdError(f"line {number}: expected USER:HASH")
        if user in users:
            raise HtpasswdError(f"line {number}: user {user!r} appears twice")
        hashed = hashed.strip()
        if hashed.startswith(("$2a$", "$2b$", "$2y$")):
            if not _BCRYPT.fullmatch(hashed):
                raise HtpasswdError(
                    f"line {number}: user {user!r}: malformed bcrypt hash"
                )
            users[user] = Entry(user, Scheme.BCRYPT, hashed.encode("ascii"))
        elif hashed.startswith("{SHA}"):
            try:
                digest = base64.b64decode(hashed[5:], validate=True)
            except binascii.Error:
                digest = b""
            if len(digest) != 20:
                raise HtpasswdError(f"line {number}: user {user!r}: malformed SHA hash")
            users[user] = Entry(user, Scheme.SHA, digest)
        else:
            raise HtpasswdError(
                f"line {number}: user {user!r}: unsupported password hash"
                " (use bcrypt, htpasswd -B, or SHA, htpasswd -s)"
            )
    if not users:
        raise HtpasswdError("no users in the file")
    return users


def read_htpasswd(path: str) -> dict[str, Entry]:
    """``parse_htpasswd`` of the file at ``path``.

    @raise HtpasswdError: unreadable or unusable file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(1024 * 1024 + 1)
    except OSError as e:
        raise HtpasswdError(f"cannot read {path!r}: {e.strerror}") from None
    if len(data) > 1024 * 1024:
        raise HtpasswdError(f"{path!r} is larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HtpasswdError(f"{path!r} is not UTF-8 text") from None
    return parse_htpasswd(text)


def parse_basic(value: bytes | None) -> tuple[str, bytes] | None:
    """(user, password) of a ``Basic`` credentials header value; None when
    absent or malformed."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep or not user:
        return None
    try:
        name = user.decode("utf-8")
    except UnicodeDecodeError:
        name = user.decode("latin-1")
    return name, password


def _check_bcrypt(password: bytes, hashed: bytes) -> bool:
    """bcrypt.checkpw (runs in a worker thread)."""
    try:
        return bool(bcrypt.checkpw(password[:_BCRYPT_MAX], hashed))
    except ValueError:
        return False


class ProxyAuth:
    """Checks ``Proxy-Authorization`` values against an htpasswd file.

    ``clock`` decides when the file is looked at again; ``reactor`` runs the
    bcrypt thread pool (``deferToThreadPool``) and stops it at shutdown.
    """

    max_verified = 1024
    """Successful bcrypt checks remembered (least recently used dropped)."""
    max_pending = 64
    """bcrypt checks queued at most; more are refused until some finish."""
    threads = 2

    def __init__(
        self, path: str, clock: IReactorTime, reactor: Any | None = None
    ) -> None:
        """@raise HtpasswdError: the file cannot be used."""
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.path = path
        self._clock = clock
        self._reactor: Any = reactor
        self._stat = _stat_key(path)
        self._users = read_htpasswd(path)
        self._looked_at = clock.seconds()
        self._secret = os.urandom(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._pending: dict[bytes, list[defer.Deferred[bool | None]]] = {}
        self._pool: ThreadPool | None = None
        self._shutdown: Any = None
        self._logged = RateLimitedLog(clock)

    @property
    def users(self) -> frozenset[str]:
        """The user names currently accepted."""
        return frozenset(self._users)

    def check(self, header: bytes | None, client: str) -> defer.Deferred[str | None]:
        """The user name ``header`` (a ``Proxy-Authorization`` value) proves,
        or None (answer 407).  Fires at once unless bcrypt has to run.

        A wrong password or unknown user is logged with the user name and
        ``client``, never with the password.
        """
        self._maybe_reload()
        credentials = parse_basic(header)
        if credentials is None:
            return defer.succeed(None)
        user, password = credentials
        entry = self._users.get(user)
        if entry is None:
            self._refused("unknown user", user, client)
            return defer.succeed(None)
        if entry.scheme is Scheme.SHA:
            good = hmac.compare_digest(hashlib.sha1(password).digest(), entry.hashed)
            return defer.succeed(self._result(good, user, client))
        key = hmac.new(
            self._secret,
            b"\0".join([user.encode("utf-8"), entry.hashed, password]),
            hashlib.sha256,
        ).digest()
        if key in self._verified:
            self._verified.move_to_end(key)
            return defer.succeed(user)
        return self._verify(key, password, entry).addCallback(
            self._verified_bcrypt, key, user, client
        )

    def close(self) -> None:
        """Stop the bcrypt threads (waits for a check in progress)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._shutdown is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown)
            self._shutdown = None
        pool.stop()

    # -- internals ---------------------------------------------------------------

    def _verify(
        self, key: bytes, password: bytes, entry: Entry
    ) -> defer.Deferred[bool | None]:
        """bcrypt in the pool (True or False); concurrent checks of the same
        credentials share one run; None when too many are queued."""
        waiter: defer.Deferred[bool | None] = defer.Deferred()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        if len(self._pending) >= self.max_pending:
            self._warn("busy", "proxy auth: too many password checks at once")
            return defer.succeed(None)
        waiters = self._pending[key] = [waiter]

        def done(result: bool | Failure) -> None:
            del self._pending[key]
            if isinstance(result, Failure):
                _log.failure("proxy auth: bcrypt failed", result)
            for d in waiters:
                d.callback(result is True)

        deferToThreadPool(
            self._reactor, self._thread_pool(), _check_bcrypt, password, entry.hashed
        ).addBoth(done)
        return waiter

    def _verified_bcrypt(
        self, good: bool | None, key: bytes, user: str, client: str
    ) -> str | None:
        if good is None:
            return None  # too busy to check, already logged
        if good and self._users.get(user) is not None:
            self._verified[key] = None
            self._verified.move_to_end(key)
            while len(self._verified) > self.max_verified:
                self._verified.popitem(last=False)
        return self._result(good, user, client)

    def _result(self, good: bool, user: str, client: str) -> str | None:
        if good:
            return user
        self._refused("wrong password", user, client)
        return None

    def _refused(self, why: str, user: str, client: str) -> None:
        suppressed = self._logged.allow(client)
        if suppressed is None:
            return
        _log.warn(
            "proxy auth: {why} for user {user!r} from {client}{more}",
            why=why,
            user=user[:100],
            client=client,
            more=held_back(suppressed),
        )

    def _warn(self, key: str, message: str) -> None:
        suppressed = self._logged.allow(key)
        if suppressed is not None:
            _log.warn("{what}{more}", what=message, more=held_back(suppressed))

    def _thread_pool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(0, self.threads, name="cachingproxy-auth")
            self._pool.start()
            self._shutdown = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self.close
            )
        return self._pool

    def _maybe_reload(self) -> None:
        """Re-read the file if it changed (one stat a second at most); a file
        that became unusable keeps the users that were loaded, with an error
        in the log."""
        now = self._clock.seconds()
        if now - self._looked_at < RELOAD_INTERVAL:
            return
        self._looked_at = now
        stat = _stat_key(self.path)
        if stat == self._stat:
            return
        self._stat = stat
        try:
            users = read_htpasswd(self.path)
        except HtpasswdError as e:
            _log.error(
                "--proxy-auth {path}: {e}; still using the {n} users loaded before",
                path=self.path,
                e=e,
                n=len(self._users),
            )
            return
        self._users = users
        self._verified.clear()
        _log.info(
            "--proxy-auth {path}: reloaded, {n} users", path=self.path, n=len(users)
        )


def _stat_key(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file: (mtime ns, size, inode), None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def send_auth_required(request: Request, via: str) -> None:
    """``407`` with the ``Proxy-Authenticate`` challenge."""
    if client_gone(request) or request.finished:
        return
    body = b"407 proxy authentication required\n"
    set_head(
        request,
        407,
        [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")],
        via=via,
        length=len(body),
    )
    # set_head drops Proxy-* headers (hop-by-hop); this one is ours.
    request.responseHeaders.setRawHeaders(
        b"Proxy-Authenticate", [CHALLENGE.encode("ascii")]
    )
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


__all__ = [
    "CHALLENGE",
    "Entry",
    "HtpasswdError",
    "ProxyAuth",
    "Scheme",
    "parse_basic",
    "parse_htpasswd",
    "read_htpasswd",
    "send_auth_required",
]
