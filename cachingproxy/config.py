"""The proxy's configuration as frozen values, built from options and TOML."""

from __future__ import annotations

import math
import re
from ipaddress import IPv4Network, IPv6Network

from attrs import field, frozen

Network = IPv4Network | IPv6Network

FOREVER = math.inf
"""Rule TTL meaning: fresh forever."""


@frozen
class Rule:
    """One freshness rule: URLs matching ``pattern`` (re.search) get ``ttl``.

    ``ttl`` is seconds (``FOREVER`` = math.inf for immutable files, ``0`` =
    revalidate every time) or None for ``origin`` (RFC 9111 shared-cache
    semantics).  ``store=False`` bypasses the cache entirely.
    """

    pattern: re.Pattern[str]
    ttl: float | None
    store: bool = True
    name: str = ""


@frozen
class Mirror:
    """``prefix`` (``/pypi/``) served from ``upstreams``, tried in order."""

    prefix: str
    upstreams: tuple[str, ...]
    merge: bool = False
    """Union the project pages of every upstream instead of taking the first
    that has the project."""
    protocol: str = ""
    """The ecosystem a preset serves here (``mirror.protocols``); ``""`` for
    a plain mirror."""


DEFAULT_ALLOW_CLIENT = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


@frozen
class ProxyConfig:
    """Everything the running proxy needs to know, validated."""

    listen: tuple[str, ...] = ("tcp:3128",)
    cache_dir: str = ""
    max_size: int = 20 * 1024**3
    max_object_size: int = 8 * 1024**3
    index_ttl: float = 300.0
    index_refresh: float = 30.0
    """How often a client's request for a fresh index may revalidate it."""
    negative_ttl: float = 60.0
    max_stale: float | None = None
    """None = unlimited."""
    offline: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    allow_client: tuple[Network, ...] = ()
    allow_upstream: tuple[Network, ...] = ()
    upstream_ports: frozenset[int] = frozenset({80, 443})
    upstream_ca: str | None = None
    names: tuple[str, ...] = ("localhost",)
    access_log: str | None = None
    admin_token: str | None = None
    """Bearer token that unlocks admin actions from non-loopback clients."""
    mirrors: tuple[Mirror, ...] = ()
    """Mounted upstreams (--mirror, --source, [[mirror]]), in final form."""
    connect_ports: frozenset[int] = frozenset({443})
    intercept: tuple[str, ...] = ()
    """Host globs whose HTTPS is intercepted (presets already expanded)."""
    ca_cert: str | None = None
    ca_key: str | None = None
    listen_tls: tuple[str, ...] = ()
    proxy_auth: str | None = None
    """htpasswd file required as Proxy-Authorization: Basic."""
    max_client_connections: int = 256
    upstream_proxy: str | None = None
    """Parent HTTP proxy (``http://host:port``) for every upstream request."""
    workers: int | None = None
    """Worker processes (--workers, SPEC 11); None is ``auto``."""
    shared_store: str | None = None
    """``s3://BUCKET/PREFIX/``: the fleet's shared tier (SPEC 12)."""
    s3_endpoint: str | None = None
    """The S3 API endpoint; None is AWS."""
    advertise: str | None = None
    """The URL at which the other nodes reach this one."""
    fleet_secret: str | None = None
    """The file holding the secret the nodes of a fleet share."""
    rules: tuple[Rule, ...] = field(default=())
    """Operator rules from the config file; they come before the default rules."""


@frozen
class FetchSettings:
    """The parts of the configuration a download needs."""

    negative_ttl: float
    max_object_size: int
    read_timeout: float
