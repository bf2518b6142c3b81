"""Checking the fleet's option values (SPEC 1, 12); used by options.py."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import attrs

from cachingproxy.config import ProxyConfig
from cachingproxy.fleet.layout import parse_location


def parse_shared_store(value: object) -> str:
    """``s3://BUCKET[/PREFIX]``, normalised (the prefix ends with ``/``)."""
    return str(parse_location(value))


def parse_http_base(value: object) -> str:
    """An ``http://`` or ``https://`` URL of a host (and port), no query."""
    if isinstance(value, str):
        parts = urlsplit(value.strip())
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            parts = urlsplit("")
        if (
            parts.scheme in ("http", "https")
            and parts.hostname
            and not parts.query
            and not parts.fragment
            and not parts.username
        ):
            return value.strip().rstrip("/")
    raise ValueError(f"{value!r} is not an http:// or https:// URL of a host")


def parse_secret_file(value: object) -> str:
    """A readable file holding a secret of at least 16 characters."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a file name")
    path = os.path.abspath(os.path.expanduser(value))
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    if len(secret) < 16:
        raise ValueError(f"{path!r} must hold a secret of at least 16 characters")
    return path


def check_fleet(config: ProxyConfig) -> str | None:
    """The fleet options that only make sense together (SPEC 12)."""
    if config.advertise is not None and config.fleet_secret is None:
        return "--advertise: needs --fleet-secret"
    for option, value in (
        ("advertise", config.advertise),
        ("fleet-secret", config.fleet_secret),
        ("s3-endpoint", config.s3_endpoint),
    ):
        if value is not None and config.shared_store is None:
            return f"--{option}: needs --shared-store"
    return None


def with_advertised_name(config: ProxyConfig) -> ProxyConfig:
    """``config`` answering to the host name of its ``--advertise`` URL too,
    so the other nodes' requests to it are addressed to the proxy itself
    (SPEC 2.3), not forwarded."""
    if config.advertise is None:
        return config
    host = (urlsplit(config.advertise).hostname or "").lower()
    if not host or host in config.names:
        return config
    return attrs.evolve(config, names=(*config.names, host))


OPTIONS = {
    "shared-store": ("shared_store", parse_shared_store),
    "s3-endpoint": ("s3_endpoint", parse_http_base),
    "advertise": ("advertise", parse_http_base),
    "fleet-secret": ("fleet_secret", parse_secret_file),
}
"""The fleet's options: (ProxyConfig field, parser) by long name."""

__all__ = [
    "OPTIONS",
    "check_fleet",
    "parse_http_base",
    "parse_secret_file",
    "parse_shared_store",
]
