"""The twistd plugin's command line: ``twistd -n cachingproxy [options]``."""

from __future__ import annotations

from typing import ClassVar

from twisted.application.service import IService
from twisted.python import usage

from cachingproxy.config import ProxyConfig
from cachingproxy.options import SETTINGS, ConfigError, make_config


class Options(usage.Options):
    """Options for ``twistd cachingproxy``; see SPEC section 1.

    Values stay strings until ``postOptions``, which checks them all, merges
    them over ``--config FILE`` and keeps the result as ``proxy_config``.
    """

    synopsis = "[options]"
    longdesc = (
        "A caching HTTP proxy for package downloads. --listen, --listen-tls,"
        " --allow-client, --allow-upstream, --mirror, --source, --intercept and"
        " --name may be repeated. Every option can also be"
        " set in the TOML file given by --config, keyed by its long name; the"
        " command line wins. SIZE takes K, M, G, T (powers of 1024)."
    )

    optFlags: ClassVar[list[list[str | None]]] = [
        ["offline", None, "Never contact upstream; serve what is cached."],
    ]
    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "cache-dir",
            None,
            None,
            "Where the cache lives; created if missing."
            " [default: $XDG_CACHE_HOME/cachingproxy or ~/.cache/cachingproxy]",
        ],
        [
            "max-size",
            None,
            None,
            "Disk budget for cached bodies (SIZE); least recently used entries"
            " are evicted. [default: 20G]",
        ],
        [
            "max-object-size",
            None,
            None,
            "Larger responses are streamed through, not stored (SIZE). [default: 8G]",
        ],
        [
            "index-ttl",
            None,
            None,
            "Seconds metadata/index responses stay fresh. [default: 300]",
        ],
        [
            "index-refresh",
            None,
            None,
            "A client asking for a fresh index (no-cache, max-age=0) has it"
            " revalidated upstream at most once per this many seconds."
            " [default: 30]",
        ],
        [
            "negative-ttl",
            None,
            None,
            "Seconds cached 404/410 answers stay fresh; 0 disables. [default: 60]",
        ],
        [
            "max-stale",
            None,
            None,
            "How many seconds old a stale entry may be and still be served when"
            " upstream fails. [default: unlimited]",
        ],
        [
            "connect-timeout",
            None,
            None,
            "Seconds allowed for the upstream TCP+TLS connect. [default: 10]",
        ],
        [
            "read-timeout",
            None,
            None,
            "Longest silence from upstream in seconds, during headers or body."
            " [default: 60]",
        ],
        [
            "upstream-ports",
            None,
            None,
            "Comma-separated ports that forward and transparent requests may"
            " reach on public addresses. [default: 80,443]",
        ],
        [
            "upstream-ca",
            None,
            None,
            "PEM file of extra CA certificates trusted for upstream HTTPS.",
        ],
        [
            "access-log",
            None,
            None,
            "File for the access log, one line per request; - is stdout."
            " [default: none]",
        ],
        [
            "admin-token",
            None,
            None,
            "Bearer token that unlocks admin actions (DELETE /cache) from"
            " non-loopback clients. [default: none]",
        ],
        [
            "connect-ports",
            None,
            None,
            "Ports CONNECT may tunnel to (comma list). [default: 443]",
        ],
        [
            "upstream-proxy",
            None,
            None,
            "Send upstream requests through this parent HTTP proxy (http://HOST:PORT).",
        ],
        [
            "ca-cert",
            None,
            None,
            "PEM certificate of the interception CA."
            " [default: generated in the cache dir]",
        ],
        [
            "ca-key",
            None,
            None,
            "PEM key of the interception CA. [default: generated in the cache dir]",
        ],
        [
            "proxy-auth",
            None,
            None,
            "htpasswd file (bcrypt or SHA); clients must send"
            " Proxy-Authorization: Basic.",
        ],
        [
            "max-client-connections",
            None,
            None,
            "Open connections one client address may hold. [default: 256]",
        ],
        [
            "workers",
            None,
            None,
            "Worker processes sharing the listening sockets and the cache:"
            " N, or auto (one per CPU core, at most 16); 1 is one process."
            " [default: auto]",
        ],
        [
            "shared-store",
            None,
            None,
            "s3://BUCKET[/PREFIX]: a second cache tier on S3-compatible object"
            " storage, shared by a fleet of nodes. [default: none]",
        ],
        [
            "s3-endpoint",
            None,
            None,
            "The S3 API endpoint URL (MinIO, Ceph RGW, SeaweedFS, R2 ...);"
            " credentials and region come from the standard AWS environment"
            " variables and files. [default: AWS]",
        ],
        [
            "advertise",
            None,
            None,
            "The URL at which the other nodes of the fleet reach this node.",
        ],
        [
            "fleet-secret",
            None,
            None,
            "File holding a secret shared by the nodes of the fleet; required"
            " with --advertise.",
        ],
        [
            "config",
            None,
            None,
            "TOML file of options (keys are the long option names) and"
            " [[rule]] tables.",
        ],
    ]

    compData = usage.Completions(
        optActions={
            "cache-dir": usage.CompleteDirs(),
            "upstream-ca": usage.CompleteFiles("*.pem"),
            "access-log": usage.CompleteFiles(),
            "config": usage.CompleteFiles("*.toml"),
        }
    )

    _proxy_config: ProxyConfig | None = None
    _failed = False
    """Parsing failed: twistd prints getUsage() before the error line, and
    SPEC 1 promises the one line naming the option, not the whole usage."""

    def __init__(self) -> None:
        super().__init__()
        # Multi-line opt_* docstrings keep their indentation otherwise.
        self.docs = {k: " ".join(v.split()) if v else v for k, v in self.docs.items()}
        for name, setting in SETTINGS.items():
            if setting.repeatable:
                self[name] = []

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to listen on (tcp:, unix:, systemd: ...). [default: tcp:3128]"""
        self["listen"].append(endpoint)

    def opt_allow_client(self, cidr: str) -> None:
        """Client address or CIDR allowed in. [default: private networks]"""
        self["allow-client"].append(cidr)

    def opt_allow_upstream(self, cidr: str) -> None:
        """Private upstream address or CIDR that may be reached, on any port."""
        self["allow-upstream"].append(cidr)

    def opt_mirror(self, mirror: str) -> None:
        """Mount upstreams under a local path: PREFIX=URL[,URL...], or a preset
        (pypi, npm, go, crates, rubygems, maven, debian, ubuntu, alpine;
        packages = all); tried in order on error, timeout, 5xx or 404."""
        self["mirror"].append(mirror)

    def opt_intercept(self, pattern: str) -> None:
        """Host glob whose HTTPS (CONNECT) is intercepted and cached with a
        local CA; the preset "packages" names the public package hosts."""
        self["intercept"].append(pattern)

    def opt_listen_tls(self, endpoint: str) -> None:
        """Endpoint for transparent port-443 interception (by SNI)."""
        self["listen-tls"].append(endpoint)

    def opt_source(self, url: str) -> None:
        """Upstream for the whole proxy, package-cache style (= --mirror /=URL)."""
        self["source"].append(url)

    def opt_name(self, name: str) -> None:
        """Name clients use for the proxy. [default: the host name, localhost]"""
        self["name"].append(name)

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802
        try:
            super().parseOptions(options)
        except usage.UsageError:
            self._failed = True
            raise

    def getUsage(self, width: int | None = None) -> str:  # noqa: N802
        if self._failed:
            return "(twistd cachingproxy --help lists the options)"
        return str(super().getUsage(width))

    def postOptions(self) -> None:  # noqa: N802
        """Check every value and build the ProxyConfig; UsageError names the
        option or config key at fault."""
        given: dict[str, object] = {}
        for name in SETTINGS:
            value = self[name]
            if name == "offline":
                if value:
                    given[name] = True
            elif value is not None and value != []:
                given[name] = value
        try:
            self._proxy_config = make_config(given, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    @property
    def proxy_config(self) -> ProxyConfig:
        """The checked configuration; available once parseOptions succeeded."""
        if self._proxy_config is None:
            raise RuntimeError("parseOptions() has not completed")
        return self._proxy_config


def makeService(options: Options) -> IService:  # noqa: N802
    """The proxy's service tree, built from the parsed options' ProxyConfig."""
    from cachingproxy.workers import make_service

    return make_service(options.proxy_config)


__all__ = ["Options", "makeService"]
