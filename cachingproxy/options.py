"""Parsing and checking option values into a ProxyConfig.

Every option can come from the command line (``tap.Options``) or from a TOML
config file whose keys are the long option names; both go through the same
parsers, and errors name the option (``--max-size: ...``) or the file and key
(``config FILE: key 'max-size': ...``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from fractions import Fraction
from ipaddress import ip_address, ip_network

from attrs import frozen

from cachingproxy.config import (
    DEFAULT_ALLOW_CLIENT,
    FOREVER,
    Mirror,
    Network,
    ProxyConfig,
    Rule,
)
from cachingproxy.fleet import settings as fleet
from cachingproxy.mirror.mirrors import (
    combine,
    parse_base,
    parse_mirror,
    parse_mirror_table,
)
from cachingproxy.workers import parse_workers


class ConfigError(ValueError):
    """A bad option or config-file value; the message names it and the problem."""


def _show(value: object) -> str:
    """``value`` as the user wrote it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|B)?", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Bytes from ``"20G"``-style text or a non-negative int.

    ``K``, ``M``, ``G``, ``T`` (optionally followed by ``B`` or ``iB``, any
    case) are powers of 1024; a bare number is bytes; fractions round down.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(Fraction(m[1]) * _UNITS[(m[2] or "").upper()])
    raise ValueError(f"{_show(value)} is not a size (use a number with K, M, G or T)")


_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_seconds(value: object) -> float:
    """A non-negative, finite number of seconds from text or a number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value >= 0 and math.isfinite(value):
            return float(value)
    elif isinstance(value, str) and _SECONDS.fullmatch(value.strip()):
        return float(value)
    raise ValueError(f"{_show(value)} is not a non-negative number of seconds")


def _parse_timeout(value: object) -> float:
    seconds = parse_seconds(value)
    if seconds == 0:
        raise ValueError("a timeout must be more than 0 seconds")
    return seconds


def _parse_max_stale(value: object) -> float | None:
    """Seconds, or None for ``"unlimited"`` (the default)."""
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    try:
        return parse_seconds(value)
    except ValueError:
        raise ValueError(
            f"{_show(value)} is not a non-negative number of seconds or 'unlimited'"
        ) from None


def parse_network(value: object) -> Network:
    """An IP network from CIDR text; a plain address is a /32 or /128.

    Host bits are masked off (``10.1.2.3/8`` is ``10.0.0.0/8``).
    """
    if isinstance(value, str):
        try:
            return ip_network(value.strip(), strict=False)
        except ValueError:
            pass
    raise ValueError(f"{_show(value)} is not an IP address or network (CIDR)")


def parse_ports(value: object) -> frozenset[int]:
    """Port numbers from ``"80,443"`` or a list of ints; ``""`` is no port."""
    if isinstance(value, str):
        items: list[object] = [p.strip() for p in value.split(",")] if value else []
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError(f"{_show(value)} is not a comma-separated list of ports")
    ports = set()
    for item in items:
        if isinstance(item, str) and item.isdecimal():
            port = int(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            port = item
        else:
            port = 0
        if not 0 < port < 65536:
            raise ValueError(f"{_show(item)} is not a port number (1-65535)")
        ports.add(port)
    return frozenset(ports)


def parse_endpoint(value: object, reactor: object | None = None) -> str:
    """Check that ``value`` is a server endpoint string Twisted can build.

    The endpoint is constructed (with the global reactor unless one is given)
    but not listened on, so unknown types, bad ports and missing ``ssl:``
    certificate files are caught before start-up.
    """
    from twisted.internet.endpoints import serverFromString

    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{_show(value)} is not a server endpoint string")
    if reactor is None:
        from twisted.internet import reactor
    try:
        serverFromString(reactor, value)
    except Exception as e:
        problem = str(e) or type(e).__name__
        raise ValueError(f"{value!r} is not a usable server endpoint: {problem}") from e
    return value


_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def parse_name(value: object) -> str:
    """A host name or IP address the proxy answers to, lower-cased, no port."""
    if isinstance(value, str):
        name = value.strip().lower()
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        if _HOST_NAME.fullmatch(name):
            return name
        try:
            ip_address(bare)
        except ValueError:
            pass
        else:
            return name
    raise ValueError(f"{_show(value)} is not a host name or IP address (no port)")


def _parse_path(value: object) -> str:
    """An absolute path; ``~`` is expanded, relative paths are from the cwd."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{_show(value)} is not a file name")
    return os.path.abspath(os.path.expanduser(value))


def parse_ca_file(value: object) -> str:
    """The absolute path of a readable PEM file with at least one certificate."""
    from cryptography.x509 import load_pem_x509_certificates

    path = _parse_path(value)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    try:
        load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path!r} holds no PEM certificate") from None
    return path


def _parse_access_log(value: object) -> str:
    """``"-"`` (stdout) or the absolute path of a file in an existing directory."""
    if value == "-":
        return "-"
    path = _parse_path(value)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory")
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"the directory of {path!r} does not exist")
    return path


def _parse_token(value: object) -> str:
    """A bearer token: printable ASCII without spaces, at least 16 characters."""
    if isinstance(value, str) and re.fullmatch(r"[\x21-\x7e]{16,}", value):
        return value
    raise ValueError("must be at least 16 printable characters without spaces")


def _parse_intercept(value: object) -> tuple[str, ...]:
    """A host glob, or the preset ``packages``."""
    from cachingproxy.tls.intercept import parse_pattern

    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not a host pattern")
    return parse_pattern(value)


def _parse_parent(value: object) -> str:
    """A parent proxy URL: ``http://host:port`` with no path."""
    base = parse_base(value)
    if not base.startswith("http://") or base.count("/") != 3:
        raise ValueError(f"{_show(value)} is not http://HOST:PORT")
    return base.rstrip("/")


def _parse_readable(value: object) -> str:
    """The absolute path of a readable file."""
    path = _parse_path(value)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    return path


def _parse_count(value: object) -> int:
    """A whole number of at least 1."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdecimal() or int(text) < 1:
        raise ValueError(f"{_show(value)} is not a whole number of at least 1")
    return int(text)


def _parse_mirror(value: object) -> tuple[Mirror, ...]:
    """``PREFIX=URL[,URL...]``, a preset name, or a ``[[mirror]]`` table."""
    if isinstance(value, dict):
        return (parse_mirror_table(value),)
    return parse_mirror(value)


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{_show(value)} is not true or false")


@frozen
class _Setting:
    """How one option maps onto a ProxyConfig field."""

    field: str
    parse: Callable[[object], object]
    repeatable: bool = False


SETTINGS: Mapping[str, _Setting] = {
    "listen": _Setting("listen", parse_endpoint, repeatable=True),
    "cache-dir": _Setting("cache_dir", _parse_path),
    "max-size": _Setting("max_size", parse_size),
    "max-object-size": _Setting("max_object_size", parse_size),
    "index-ttl": _Setting("index_ttl", parse_seconds),
    "index-refresh": _Setting("index_refresh", parse_seconds),
    "negative-ttl": _Setting("negative_ttl", parse_seconds),
    "max-stale": _Setting("max_stale", _parse_max_stale),
    "offline": _Setting("offline", _parse_bool),
    "connect-timeout": _Setting("connect_timeout", _parse_timeout),
    "read-timeout": _Setting("read_timeout", _parse_timeout),
    "allow-client": _Setting("allow_client", parse_network, repeatable=True),
    "allow-upstream": _Setting("allow_upstream", parse_network, repeatable=True),
    "upstream-ports": _Setting("upstream_ports", parse_ports),
    "upstream-ca": _Setting("upstream_ca", parse_ca_file),
    "name": _Setting("names", parse_name, repeatable=True),
    "access-log": _Setting("access_log", _parse_access_log),
    "admin-token": _Setting("admin_token", _parse_token),
    "mirror": _Setting("mirrors", _parse_mirror, repeatable=True),
    "connect-ports": _Setting("connect_ports", parse_ports),
    "upstream-proxy": _Setting("upstream_proxy", _parse_parent),
    "intercept": _Setting("intercept", _parse_intercept, repeatable=True),
    "ca-cert": _Setting("ca_cert", _parse_readable),
    "ca-key": _Setting("ca_key", _parse_readable),
    "listen-tls": _Setting("listen_tls", parse_endpoint, repeatable=True),
    "proxy-auth": _Setting("proxy_auth", _parse_readable),
    "max-client-connections": _Setting("max_client_connections", _parse_count),
    "source": _Setting("sources", parse_base, repeatable=True),
    "workers": _Setting("workers", parse_workers),
    **{name: _Setting(*how) for name, how in fleet.OPTIONS.items()},
}
"""Every option that can come from the command line or the config file,
by its long name (which is also its config-file key)."""

_LATER_KEYS: frozenset[str] = frozenset()
"""Config-file keys accepted and ignored for now: ``mirror`` (``[[mirror]]``
tables, SPEC 6) is implemented by a later issue, and files written for it
should not stop this release from starting."""


def _convert(name: str, value: object) -> tuple[str, object]:
    """``(field, parsed value)`` for option ``name``; ValueError says why not."""
    setting = SETTINGS[name]
    if not setting.repeatable:
        return setting.field, setting.parse(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"{_show(value)} is not a list")
    items = [setting.parse(item) for item in value]
    if setting.field == "listen" and not items:
        raise ValueError("at least one endpoint is needed")
    if setting.field == "names":
        items = list(dict.fromkeys(items))
    if setting.field in ("mirrors", "intercept"):
        items = [m for group in items for m in group]  # type: ignore[attr-defined]
    return setting.field, tuple(items)


def parse_rule(table: object, index: int) -> Rule:
    """The ``index``-th (1-based) ``[[rule]]`` table of a config file as a Rule.

    The ValueError message names the key at fault.
    """
    if not isinstance(table, dict):
        raise ValueError("must be a table ([[rule]])")
    unknown = sorted(set(table) - {"match", "ttl", "store"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (use match, ttl, store)")
    store = table.get("store", True)
    if not isinstance(store, bool):
        raise ValueError(f"key 'store': {_show(store)} is not true or false")
    match = table.get("match")
    if not isinstance(match, str):
        raise ValueError("key 'match': a regular expression string is required")
    try:
        pattern = re.compile(match)
    except re.error as e:
        raise ValueError(
            f"key 'match': {match!r} is not a regular expression: {e}"
        ) from None
    ttl = table.get("ttl")
    if ttl is None and store:
        raise ValueError("key 'ttl' is required (seconds, 'forever' or 'origin')")
    if ttl is None or ttl == "origin":
        seconds = None
    elif ttl == "forever":
        seconds = FOREVER
    else:
        try:
            seconds = parse_seconds(ttl)
        except ValueError:
            raise ValueError(
                f"key 'ttl': {_show(ttl)} is not a number of seconds,"
                " 'forever' or 'origin'"
            ) from None
    return Rule(pattern=pattern, ttl=seconds, store=store, name=f"rule {index}")


def read_config_file(path: str) -> tuple[dict[str, object], tuple[Rule, ...]]:
    """The settings (by ProxyConfig field) and rules of TOML file ``path``.

    Every value is checked, even ones the command line will override.
    @raise ConfigError: unreadable file, bad TOML, unknown key or bad value.
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from None
    values: dict[str, object] = {}
    rules: list[Rule] = []
    for key, value in document.items():
        where = f"config {path}: key {key!r}"
        if key == "rule":
            tables = value if isinstance(value, list) else [value]
            for i, table in enumerate(tables, 1):
                try:
                    rules.append(parse_rule(table, i))
                except ValueError as e:
                    raise ConfigError(f"config {path}: rule {i}: {e}") from None
        elif key in SETTINGS:
            try:
                field_name, values[field_name] = _convert(key, value)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        elif key == "config":
            raise ConfigError(f"{where}: a config file cannot name another")
        elif key not in _LATER_KEYS:
            close = difflib.get_close_matches(key, [*SETTINGS, "rule"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown option{hint}")
    return values, tuple(rules)


def default_cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """``$XDG_CACHE_HOME/cachingproxy``, else ``~/.cache/cachingproxy``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "cachingproxy"))


def ensure_cache_dir(path: str) -> None:
    """Create directory ``path`` if missing; ValueError unless it is writable."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {path!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{path!r} is not writable")


def make_config(
    command_line: Mapping[str, object],
    config_file: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
    create_cache_dir: bool = True,
) -> ProxyConfig:
    """The ProxyConfig from defaults, then ``config_file``, then the command line.

    ``command_line`` maps long option names (keys of SETTINGS) to the strings
    given (a list of them for repeatable options; True for ``offline``); an
    option given there replaces the file's value, a repeated one its whole
    list.  With ``create_cache_dir`` the cache directory is created and
    checked.

    @raise ConfigError: naming the option or config key and the problem.
    """
    values: dict[str, object] = {
        "cache_dir": default_cache_dir(environ),
        "names": tuple(
            dict.fromkeys([(hostname or socket.gethostname()).lower(), "localhost"])
        ),
        "allow_client": tuple(ip_network(n) for n in DEFAULT_ALLOW_CLIENT),
    }
    file_values: dict[str, object] = {}
    rules: tuple[Rule, ...] = ()
    if config_file is not None:
        file_values, rules = read_config_file(config_file)
        values.update(file_values)
    for name, value in command_line.items():
        try:
            field_name, values[field_name] = _convert(name, value)
        except ValueError as e:
            raise ConfigError(f"--{name}: {e}") from None
    values["mirrors"] = combine(
        values.pop("mirrors", ()),  # type: ignore[arg-type]
        values.pop("sources", ()),  # type: ignore[arg-type]
    )
    config = ProxyConfig(**values, rules=rules)  # type: ignore[arg-type]
    if (problem := fleet.check_fleet(config)) is not None:
        raise ConfigError(problem)
    if create_cache_dir:
        try:
            ensure_cache_dir(config.cache_dir)
        except ValueError as e:
            where = "--cache-dir"
            if "cache-dir" not in command_line and "cache_dir" in file_values:
                where = f"config {config_file}: key 'cache-dir'"
            raise ConfigError(f"{where}: {e}") from None
    return config


__all__ = [
    "SETTINGS",
    "ConfigError",
    "default_cache_dir",
    "ensure_cache_dir",
    "make_config",
    "parse_ca_file",
    "parse_endpoint",
    "parse_name",
    "parse_network",
    "parse_ports",
    "parse_rule",
    "parse_seconds",
    "parse_size",
    "read_config_file",
]
