"""Claims on downloads that every worker sharing a cache directory can see.

A worker that starts the upstream download of a key first takes its claim:
an exclusive ``flock`` on ``run/claims/KEY.lock``, held for as long as the
download runs, so the kernel itself drops the claim of a worker that dies.
Beside it the owner publishes what it knows in ``KEY.json`` (replaced
atomically by rename): the response head once it has one, the name of the
body file it is writing in ``tmp/``, and at the end ``done`` or ``failed``.
Other workers read that file to follow the download (see
:mod:`cachingproxy.workers.remote`) and test the lock to learn whether the
owner still lives.

A purge (SPEC 9) in one worker marks the claims it matches
(``KEY.purged``); the owner sees the mark and stores nothing.

A lock file is unlinked by its owner (after the final state is published)
while still locked; whoever locks a file checks afterwards that it is still
the one at the path, so two workers never both own a key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from attrs import asdict, field, frozen

STREAM = "stream"
"""The owner is storing a body (``body`` names its file in ``tmp/``)."""
DONE = "done"
"""The body is whole (``size`` bytes)."""
FAILED = "failed"
"""The download broke off; followers stop with an error."""
OTHER = "other"
"""No body to share (an error answer, 304, or a response not stored):
followers fetch for themselves."""
FETCHING = "fetching"
"""Claimed; no response yet."""
FINAL = frozenset({DONE, FAILED, OTHER})


def _pairs(items: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in items)


def key_of(url: str) -> str:
    """The file name stem of ``url``'s claim."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:40]


@frozen
class ClaimState:
    """What the owner of a claim has published."""

    id: str
    """Changes with every owner (a worker taking over publishes a new id)."""
    url: str
    pid: int
    state: str = FETCHING
    status: int = 0
    phrase: str = ""
    headers: tuple[tuple[str, str], ...] = field(default=(), converter=_pairs)
    vary: tuple[str, ...] = field(default=(), converter=tuple)
    variant: str = ""
    total: int | None = None
    body: str | None = None
    """The body file's name in ``tmp/`` (``bodies/XX/NAME`` once committed)."""
    size: int | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    checks_digest: bool = False
    """The owner checks a published digest at the end: followers hold the
    last byte back until it publishes ``done``."""

    @classmethod
    def from_json(cls, data: bytes) -> ClaimState:
        return cls(**json.loads(data))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @property
    def final(self) -> bool:
        return self.state in FINAL


class Claim:
    """A claim this worker holds; :meth:`release` ends it."""

    def __init__(self, claims: Claims, key: str, fd: int, state: ClaimState) -> None:
        self._claims = claims
        self.key = key
        self._fd = fd
        self.state = state
        claims._write(key, state)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def publish(self, **changes: Any) -> ClaimState:
        """Replace fields of the published state."""
        self.state = state = _evolve(self.state, **changes)
        if self.held:
            self._claims._write(self.key, state)
        return state

    @property
    def purged(self) -> bool:
        """Whether a purge in any worker marked this claim."""
        return os.path.exists(self._claims._path(self.key, ".purged"))

    def release(self, **final: Any) -> None:
        """Publish the final state and let go (the state file stays, for
        followers that have not read it yet, until :meth:`forget`)."""
        if not self.held:
            return
        if final:
            self.publish(**final)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._claims._path(self.key, ".lock"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._claims._path(self.key, ".purged"))
        os.close(self._fd)
        self._fd = -1

    def forget(self) -> None:
        """Remove the final state (once followers have had time to read it),
        unless another claim has been taken since."""
        if self.held:
            return
        claims = self._claims
        if os.path.exists(claims._path(self.key, ".lock")):
            return  # a new owner; its state replaces ours
        current = claims.read(self.state.url)
        if current is not None and current.id == self.state.id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claims._path(self.key, ".json"))


class Claims:
    """The claims directory of one cache (``run/claims``)."""

    def __init__(self, directory: str, clock: Callable[[], float]) -> None:
        self.directory = directory
        self._clock = clock
        os.makedirs(directory, exist_ok=True)

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, key + suffix)

    def _write(self, key: str, state: ClaimState) -> None:
        path = self._path(key, ".json")
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as f:
            f.write(state.to_json())
        os.replace(temporary, path)

    def acquire(
        self,
        url: str,
        unless: Callable[[ClaimState], bool] = lambda previous: False,
    ) -> Claim | None:
        """Take ``url``'s claim, or None when another worker holds it or,
        once locked, the state of the previous claim satisfies ``unless``."""
        key = key_of(url)
        path = self._path(key, ".lock")
        for _ in range(8):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if _same_file(fd, path):
                previous = self.read(url)
                if previous is not None and unless(previous):
                    os.close(fd)
                    return None
                # A mark left by a purge that raced the previous owner's
                # release is not about this download, which starts now.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(key, ".purged"))
                state = ClaimState(
                    id=secrets.token_hex(8),
                    url=url,
                    pid=os.getpid(),
                    started_at=self._clock(),
                )
                return Claim(self, key, fd, state)
            os.close(fd)  # unlinked by its last owner meanwhile: try again
        return None

    def read(self, url: str) -> ClaimState | None:
        """The state published for ``url``'s claim, if any."""
        try:
            with open(self._path(key_of(url), ".json"), "rb") as f:
                state = ClaimState.from_json(f.read())
        except (OSError, ValueError, TypeError):
            return None
        return state if state.url == url else None

    def watch(self, url: str) -> StateWatch:
        """A reader of ``url``'s state that parses it only when it changed."""
        return StateWatch(self, url)

    def owner_alive(self, url: str) -> bool:
        """Whether some worker holds ``url``'s claim now."""
        path = self._path(key_of(url), ".lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def states(self) -> Iterator[ClaimState]:
        """Every published state (downloads in flight in any worker, and
        recently ended ones)."""
        for name in os.listdir(self.directory):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.directory, name), "rb") as f:
                        yield ClaimState.from_json(f.read())
                except (OSError, ValueError, TypeError):
                    continue

    def in_flight(self) -> list[ClaimState]:
        """The claims held now whose download is not over."""
        return [s for s in self.states() if not s.final and self.owner_alive(s.url)]

    def mark_purged(self, matches: Callable[[str], bool]) -> int:
        """Mark every claim in flight whose URL ``matches`` as purged."""
        marked = 0
        for state in self.states():
            if not state.final and matches(state.url):
                with open(self._path(key_of(state.url), ".purged"), "wb"):
                    pass
                marked += 1
        return marked


class StateWatch:
    """Reads one claim's state again only when its file was replaced."""

    def __init__(self, claims: Claims, url: str) -> None:
        self._claims = claims
        self._url = url
        self._path = claims._path(key_of(url), ".json")
        self._stamp: tuple[int, int, int] | None = None
        self._state: ClaimState | None = None

    def read(self) -> ClaimState | None:
        try:
            st = os.stat(self._path)
        except OSError:
            self._stamp, self._state = None, None
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            state = self._claims.read(self._url)
            # Keep the stamp only for a state read whole (not mid-replace).
            self._stamp = stamp if state is not None else None
            self._state = state
        return self._state


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _evolve(current: ClaimState, **changes: Any) -> ClaimState:
    values = asdict(current)
    values.update(changes)
    return ClaimState(**values)


__all__ = [
    "DONE",
    "FAILED",
    "FETCHING",
    "OTHER",
    "STREAM",
    "Claim",
    "ClaimState",
    "Claims",
    "StateWatch",
    "key_of",
]
