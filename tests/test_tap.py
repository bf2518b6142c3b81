"""The command-line layer: options, config file, the twistd plugin."""

from __future__ import annotations

import os
import re
import socket
from ipaddress import ip_network
from pathlib import Path

from twisted.application.service import IService, IServiceMaker
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import TestCase

from cachingproxy import tap
from cachingproxy.config import DEFAULT_ALLOW_CLIENT, FOREVER, Mirror, ProxyConfig, Rule
from cachingproxy.options import (
    parse_name,
    parse_network,
    parse_ports,
    parse_seconds,
    parse_size,
)

from .support import TWISTD, cert_pem, checkout_env, run_process, self_signed

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "cachingproxy.toml"

G = 1024**3


class _EnvMixin(TestCase):
    """Keeps every test's default cache dir inside its own temporary dir."""

    def setUp(self) -> None:
        self.tmp = Path(self.mktemp()).resolve()
        self.tmp.mkdir()
        self.set_env("XDG_CACHE_HOME", str(self.tmp / "xdg"))

    def set_env(self, name: str, value: str | None) -> None:
        """Set (or with None, unset) an environment variable for this test."""
        old = os.environ.get(name)
        self.addCleanup(self._restore_env, name, old)
        self._restore_env(name, value)

    @staticmethod
    def _restore_env(name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def parse(self, *argv: str) -> ProxyConfig:
        """The ProxyConfig ``twistd cachingproxy ARGV`` would run with."""
        options = tap.Options()
        options.parseOptions(list(argv))
        return options.proxy_config

    def parse_error(self, *argv: str) -> str:
        """The UsageError message ``twistd cachingproxy ARGV`` stops with."""
        options = tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, list(argv))
        return str(error)

    def write(self, name: str, text: str | bytes) -> str:
        """Write a file in this test's directory; return its path."""
        path = self.tmp / name
        if isinstance(text, str):
            text = text.encode()
        path.write_bytes(text)
        return str(path)

    def defaults(self, **changes: object) -> ProxyConfig:
        """The config with no options at all, with ``changes``."""
        values: dict[str, object] = {
            "cache_dir": str(self.tmp / "xdg" / "cachingproxy"),
            "names": tuple(dict.fromkeys([socket.gethostname().lower(), "localhost"])),
            "allow_client": tuple(ip_network(n) for n in DEFAULT_ALLOW_CLIENT),
        }
        values.update(changes)
        return ProxyConfig(**values)  # type: ignore[arg-type]


class ParseValueTests(TestCase):
    """The value parsers shared by the command line and the config file."""

    def test_sizes(self) -> None:
        """Sizes are bytes, or K/M/G/T in powers of 1024, any case, optional B/iB."""
        cases = {
            "0": 0,
            "1048576": 1048576,
            "512K": 512 * 1024,
            "512k": 512 * 1024,
            "3M": 3 * 1024**2,
            "20G": 20 * G,
            "20GB": 20 * G,
            "20GiB": 20 * G,
            "1.5G": 3 * G // 2,
            "2T": 2 * 1024**4,
            " 8G ": 8 * G,
            "100B": 100,
            42: 42,
        }
        for text, expected in cases.items():
            self.assertEqual(parse_size(text), expected, text)

    def test_bad_sizes(self) -> None:
        """Negative, unitless junk, unknown suffixes and booleans are not sizes."""
        for text in ["12X", "", "G", "-1", "1.2.3G", "20 GG", -1, True, 1.5, None]:
            error = self.assertRaises(ValueError, parse_size, text)
            self.assertIn("is not a size", str(error))

    def test_seconds(self) -> None:
        """Seconds are non-negative ints or floats, as text or numbers."""
        cases = {"0": 0.0, "300": 300.0, "0.5": 0.5, ".25": 0.25, 60: 60.0, 1.5: 1.5}
        for value, expected in cases.items():
            self.assertEqual(parse_seconds(value), expected, value)

    def test_bad_seconds(self) -> None:
        """Negative, non-finite and non-numeric values are not seconds."""
        for value in ["-1", "nan", "inf", "1e3", "5m", "", -0.5, float("inf"), False]:
            error = self.assertRaises(ValueError, parse_seconds, value)
            self.assertIn("non-negative number of seconds", str(error))

    def test_networks(self) -> None:
        """CIDRs keep their prefix (host bits masked); plain addresses are /32 or /128."""
        cases = {
            "10.0.0.0/8": "10.0.0.0/8",
            "10.1.2.3/8": "10.0.0.0/8",
            "192.168.1.5": "192.168.1.5/32",
            "::1": "::1/128",
            "fc00::/7": "fc00::/7",
        }
        for text, expected in cases.items():
            self.assertEqual(parse_network(text), ip_network(expected), text)
        for bad in ["10.0.0.0/33", "300.1.1.1", "example.com", "", 10]:
            self.assertRaises(ValueError, parse_network, bad)

    def test_ports(self) -> None:
        """Port lists are comma-separated text or lists of ints, 1-65535."""
        self.assertEqual(parse_ports("80,443"), frozenset({80, 443}))
        self.assertEqual(parse_ports(" 80 , 8080 "), frozenset({80, 8080}))
        self.assertEqual(parse_ports([80, 443]), frozenset({80, 443}))
        self.assertEqual(parse_ports(""), frozenset())
        for bad in ["0", "65536", "80,", "http", "80;443", [True], 80]:
            self.assertRaises(ValueError, parse_ports, bad)

    def test_names(self) -> None:
        """Names are host names or IP literals, lower-cased, without a port."""
        self.assertEqual(parse_name("Cache.Example.NET"), "cache.example.net")
        self.assertEqual(parse_name("192.168.1.2"), "192.168.1.2")
        self.assertEqual(parse_name("[::1]"), "[::1]")
        for bad in ["", "cache:3128", "a b", "http://cache/", "-x", 5]:
            self.assertRaises(ValueError, parse_name, bad)


class CommandLineTests(_EnvMixin):
    """``twistd cachingproxy OPTIONS`` parsed into a ProxyConfig."""

    def test_every_option(self) -> None:
        """Each option lands, parsed, in its ProxyConfig field."""
        ca = self.write("ca.pem", cert_pem(self_signed()[0]))
        cache = self.tmp / "cache"
        config = self.parse(
            "--listen=tcp:8080:interface=127.0.0.1",
            "--cache-dir",
            str(cache),
            "--max-size=100M",
            "--max-object-size=1G",
            "--index-ttl=30",
            "--negative-ttl=0",
            "--max-stale=86400",
            "--offline",
            "--connect-timeout=2.5",
            "--read-timeout=120",
            "--allow-client=192.168.7.0/24",
            "--allow-upstream=10.9.8.7",
            "--upstream-ports=80,443,8080",
            f"--upstream-ca={ca}",
            "--name=Cache.Example.net",
            f"--access-log={self.tmp / 'access.log'}",
        )
        self.assertEqual(
            config,
            ProxyConfig(
                listen=("tcp:8080:interface=127.0.0.1",),
                cache_dir=str(cache),
                max_size=100 * 1024**2,
                max_object_size=G,
                index_ttl=30.0,
                negative_ttl=0.0,
                max_stale=86400.0,
                offline=True,
                connect_timeout=2.5,
                read_timeout=120.0,
                allow_client=(ip_network("192.168.7.0/24"),),
                allow_upstream=(ip_network("10.9.8.7/32"),),
                upstream_ports=frozenset({80, 443, 8080}),
                upstream_ca=ca,
                names=("cache.example.net",),
                access_log=str(self.tmp / "access.log"),
                rules=(),
            ),
        )
        self.assertTrue(cache.is_dir())

    def test_defaults(self) -> None:
        """With no options: SPEC 1's defaults, cache in $XDG_CACHE_HOME, created."""
        config = self.parse()
        self.assertEqual(config, self.defaults())
        self.assertEqual(config.listen, ("tcp:3128",))
        self.assertEqual(config.max_size, 20 * G)
        self.assertEqual(config.max_object_size, 8 * G)
        self.assertEqual(config.upstream_ports, frozenset({80, 443}))
        self.assertEqual((config.index_ttl, config.negative_ttl), (300.0, 60.0))
        self.assertEqual((config.connect_timeout, config.read_timeout), (10.0, 60.0))
        self.assertEqual((config.max_stale, config.offline), (None, False))
        self.assertEqual((config.upstream_ca, config.access_log), (None, None))
        self.assertEqual(config.allow_upstream, ())
        self.assertIn("localhost", config.names)
        self.assertTrue(os.path.isdir(config.cache_dir))

    def test_default_cache_dir_without_xdg(self) -> None:
        """Without XDG_CACHE_HOME the cache is ~/.cache/cachingproxy."""
        self.set_env("XDG_CACHE_HOME", None)
        self.set_env("HOME", str(self.tmp / "home"))
        config = self.parse()
        expected = self.tmp / "home" / ".cache" / "cachingproxy"
        self.assertEqual(config.cache_dir, str(expected))
        self.assertTrue(expected.is_dir())

    def test_relative_and_home_paths(self) -> None:
        """Paths are made absolute; ``~`` is expanded."""
        self.set_env("HOME", str(self.tmp))
        config = self.parse("--cache-dir=~/c", "--access-log=-")
        self.assertEqual(config.cache_dir, str(self.tmp / "c"))
        self.assertEqual(config.access_log, "-")
        config = self.parse("--cache-dir=rel")
        self.assertEqual(config.cache_dir, os.path.abspath("rel"))

    def test_repeatable(self) -> None:
        """Repeatable options keep every value in order; --name drops repeats."""
        config = self.parse(
            "--listen=tcp:3128",
            "--listen=tcp6:3128:interface=\\:\\:1",
            "--listen=unix:" + str(self.tmp / "sock"),
            "--allow-client=10.0.0.0/8",
            "--allow-client=::1",
            "--allow-upstream=127.0.0.1",
            "--allow-upstream=fd00::/8",
            "--name=a.example",
            "--name=B.example",
            "--name=a.example",
        )
        self.assertEqual(
            config.listen,
            ("tcp:3128", "tcp6:3128:interface=\\:\\:1", f"unix:{self.tmp / 'sock'}"),
        )
        self.assertEqual(
            config.allow_client, (ip_network("10.0.0.0/8"), ip_network("::1/128"))
        )
        self.assertEqual(
            config.allow_upstream, (ip_network("127.0.0.1/32"), ip_network("fd00::/8"))
        )
        self.assertEqual(config.names, ("a.example", "b.example"))

    def test_help_lists_every_option(self) -> None:
        """``--help`` shows every option of SPEC 1 this release has."""
        text = str(tap.Options())
        for name in [
            "listen", "cache-dir", "max-size", "max-object-size", "index-ttl",
            "negative-ttl", "max-stale", "offline", "connect-timeout",
            "read-timeout", "allow-client", "allow-upstream", "upstream-ports",
            "upstream-ca", "name", "access-log", "config", "index-refresh",
            "mirror", "source", "connect-ports", "upstream-proxy", "intercept",
            "ca-cert", "ca-key", "listen-tls", "proxy-auth",
            "max-client-connections", "admin-token", "workers", "shared-store",
            "s3-endpoint", "advertise", "fleet-secret",
        ]:  # fmt: skip
            self.assertIn(f"--{name}=" if name != "offline" else "--offline", text)

    def test_help_text_is_wrapped_cleanly(self) -> None:
        """Multi-line option docstrings show as one paragraph, not with
        their source indentation inside the help text."""
        options = tap.Options()
        for name, doc in options.docs.items():
            if doc:
                self.assertNotIn("  ", doc, name)

    def test_proxy_config_before_parsing(self) -> None:
        """The config is only available after parseOptions succeeded."""
        self.assertRaises(RuntimeError, lambda: tap.Options().proxy_config)


class ConfigFileTests(_EnvMixin):
    """``--config FILE``: TOML keyed by the long option names, plus rules."""

    FILE = """\
        listen = ["tcp:3129", "tcp:3130"]
        max-size = "1T"
        max-object-size = 1073741824
        index-ttl = 600
        negative-ttl = 0.5
        max-stale = "unlimited"
        offline = true
        connect-timeout = 3
        read-timeout = 30.5
        allow-client = ["10.1.0.0/16", "::1"]
        allow-upstream = "192.168.5.5"
        upstream-ports = "80,8080"
        name = ["proxy.lan"]
        access-log = "-"
        """

    def test_file_values(self) -> None:
        """Every key of the file lands in its field; a string serves as a list."""
        path = self.write("c.toml", self.FILE.replace("        ", ""))
        config = self.parse("--config", path)
        self.assertEqual(
            config,
            self.defaults(
                listen=("tcp:3129", "tcp:3130"),
                max_size=1024**4,
                max_object_size=G,
                index_ttl=600.0,
                negative_ttl=0.5,
                max_stale=None,
                offline=True,
                connect_timeout=3.0,
                read_timeout=30.5,
                allow_client=(ip_network("10.1.0.0/16"), ip_network("::1")),
                allow_upstream=(ip_network("192.168.5.5"),),
                upstream_ports=frozenset({80, 8080}),
                names=("proxy.lan",),
                access_log="-",
            ),
        )

    def test_command_line_overrides_file(self) -> None:
        """An option on the command line wins; a repeated one replaces the list."""
        path = self.write(
            "c.toml",
            self.FILE.replace("        ", "") + f'cache-dir = "{self.tmp / "f"}"\n',
        )
        config = self.parse(
            "--config",
            path,
            "--listen=tcp:4000",
            "--index-ttl=5",
            "--allow-client=10.2.0.0/16",
            "--allow-client=10.3.0.0/16",
            f"--cache-dir={self.tmp / 'cli'}",
        )
        self.assertEqual(config.listen, ("tcp:4000",))
        self.assertEqual(config.index_ttl, 5.0)
        self.assertEqual(
            config.allow_client,
            (ip_network("10.2.0.0/16"), ip_network("10.3.0.0/16")),
        )
        self.assertEqual(config.cache_dir, str(self.tmp / "cli"))
        self.assertFalse((self.tmp / "f").exists())
        # Untouched keys keep the file's values.
        self.assertEqual(config.max_size, 1024**4)
        self.assertEqual(config.names, ("proxy.lan",))
        self.assertTrue(config.offline)

    def test_rules(self) -> None:
        """[[rule]] tables become Rules in file order, named by their position."""
        path = self.write(
            "c.toml",
            """
[[rule]]
match = '\\.whl$'
ttl = "forever"

[[rule]]
match = '/simple/'
ttl = 3600

[[rule]]
match = 'latest'
ttl = 0

[[rule]]
match = '^http://example\\.com/'
ttl = "origin"

[[rule]]
match = 'private'
store = false
""",
        )
        self.assertEqual(
            self.parse("--config", path).rules,
            (
                Rule(re.compile(r"\.whl$"), FOREVER, True, "rule 1"),
                Rule(re.compile("/simple/"), 3600.0, True, "rule 2"),
                Rule(re.compile("latest"), 0.0, True, "rule 3"),
                Rule(re.compile(r"^http://example\.com/"), None, True, "rule 4"),
                Rule(re.compile("private"), None, False, "rule 5"),
            ),
        )

    def test_mirrors_from_file_and_command_line(self) -> None:
        """``mirror`` strings, presets and [[mirror]] tables in the file become
        Mirrors; --mirror replaces the file's list; --source mounts ``/``; a
        later prefix overrides a preset's."""
        text = 'mirror = ["pypi", "/pypi/=http://10.0.0.5:8080/root/pypi,https://pypi.org/"]\n'
        config = self.parse("--config", self.write("m.toml", text))
        self.assertEqual(
            config.mirrors,
            (
                Mirror(
                    "/pypi-files/",
                    ("https://files.pythonhosted.org/",),
                    protocol="pypi",
                ),
                Mirror(
                    "/pypi/",
                    ("http://10.0.0.5:8080/root/pypi/", "https://pypi.org/"),
                    protocol="pypi",
                ),
            ),
        )
        tables = '[[mirror]]\nprefix = "/py"\nupstreams = ["https://a.example/"]\nmerge = true\n'
        config = self.parse("--config", self.write("t.toml", tables))
        self.assertEqual(
            config.mirrors, (Mirror("/py/", ("https://a.example/",), merge=True),)
        )
        config = self.parse(
            "--config",
            self.write("t2.toml", tables),
            "--mirror",
            "npm",
            "--source",
            "http://deb.example/debian",
        )
        self.assertEqual(
            config.mirrors,
            (
                Mirror("/npm/", ("https://registry.npmjs.org/",), protocol="npm"),
                Mirror("/", ("http://deb.example/debian/",)),
            ),
        )

    def test_bad_mirrors(self) -> None:
        """Bad --mirror values name the option and the problem."""
        for value, problem in [
            ("pypy", "is not PREFIX=URL"),
            ("/x/=ftp://a/", "is not an http(s) URL"),
            ("x=https://a/", "is not a path prefix"),
            ("/x/=", "names no upstream URL"),
        ]:
            message = self.parse_error(f"--mirror={value}")
            self.assertTrue(message.startswith("--mirror: "), message)
            self.assertIn(problem, message)

    def test_example_config_as_is(self) -> None:
        """etc/cachingproxy.toml as shipped (all commented) gives the defaults."""
        self.assertEqual(self.parse("--config", str(EXAMPLE_CONFIG)), self.defaults())

    def test_example_config_lists_every_key(self) -> None:
        """etc/cachingproxy.toml has a (commented) line for every option."""
        from cachingproxy.options import SETTINGS

        text = EXAMPLE_CONFIG.read_text()
        for name in SETTINGS:
            if name != "config":
                self.assertRegex(text, rf"(?m)^# ?{re.escape(name)} = ", name)

    def test_example_config_uncommented(self) -> None:
        """etc/cachingproxy.toml's ``#key = value`` lines are the real defaults,
        and its [[rule]] examples are valid."""
        self.set_env("XDG_CACHE_HOME", None)
        self.set_env("HOME", str(self.tmp / "home"))
        text = re.sub(r"(?m)^#(?=[a-z\[])", "", EXAMPLE_CONFIG.read_text())
        config = self.parse("--config", self.write("all.toml", text))
        self.assertEqual(
            config.rules,
            (
                Rule(
                    re.compile(r"^https?://ci\.example\.net/artifacts/.*\.whl$"),
                    FOREVER,
                    True,
                    "rule 1",
                ),
                Rule(
                    re.compile(r"^https?://registry\.example\.net/simple/"),
                    3600.0,
                    True,
                    "rule 2",
                ),
                Rule(re.compile("/latest/"), 0.0, True, "rule 3"),
                Rule(
                    re.compile(r"^https?://downloads\.example\.net/"),
                    None,
                    True,
                    "rule 4",
                ),
                Rule(re.compile(r"^https?://[^/]*\.internal/"), None, False, "rule 5"),
            ),
        )
        self.assertEqual(
            config,
            self.defaults(
                cache_dir=str(self.tmp / "home" / ".cache" / "cachingproxy"),
                rules=config.rules,
            ),
        )


class BadValueTests(_EnvMixin):
    """Bad values stop start-up with a UsageError naming the option or key."""

    def test_bad_command_line_values(self) -> None:
        """Each bad option value is refused with ``--OPTION: problem``."""
        no_cert = self.write("empty.pem", "not a certificate\n")
        cases = [
            ("max-size", "12X", "--max-size: '12X' is not a size (use a number"),
            ("max-object-size", "-1", "is not a size"),
            ("index-ttl", "-5", "'-5' is not a non-negative number of seconds"),
            ("negative-ttl", "soon", "is not a non-negative number of seconds"),
            ("max-stale", "forever", "or 'unlimited'"),
            ("connect-timeout", "0", "more than 0 seconds"),
            ("read-timeout", "nan", "is not a non-negative number of seconds"),
            ("allow-client", "10.0.0.300", "is not an IP address or network"),
            ("allow-upstream", "example.com", "is not an IP address or network"),
            ("upstream-ports", "80,http", "'http' is not a port number"),
            ("upstream-ports", "70000", "is not a port number"),
            ("listen", "bogus:3128", "is not a usable server endpoint"),
            ("listen", "tcp:notaport", "is not a usable server endpoint"),
            ("upstream-ca", str(self.tmp / "missing.pem"), "cannot read"),
            ("upstream-ca", no_cert, "holds no PEM certificate"),
            ("name", "cache:3128", "is not a host name or IP address"),
            ("access-log", "/nonexistent/dir/access.log", "does not exist"),
            ("access-log", str(self.tmp), "is a directory"),
            ("config", str(self.tmp / "missing.toml"), "cannot read"),
            ("admin-token", "short", "at least 16 printable characters"),
        ]
        for option, value, problem in cases:
            message = self.parse_error(f"--{option}={value}")
            self.assertTrue(message.startswith(f"--{option}: "), message)
            self.assertIn(problem, message)

    def test_bad_config_file_values(self) -> None:
        """Each bad config file is refused with ``config FILE: ...`` naming the key."""
        cases: list[tuple[str | bytes, str]] = [
            ("index-ttl = -1", "key 'index-ttl': -1 is not a non-negative number"),
            ('max-size = "12X"', "key 'max-size': '12X' is not a size"),
            ('offline = "yes"', "key 'offline': 'yes' is not true or false"),
            ('listen = "bogus:1"', "key 'listen': 'bogus:1' is not a usable"),
            ("listen = []", "key 'listen': at least one endpoint"),
            ("listen = 3128", "key 'listen': 3128 is not a list"),
            ('allow-client = ["10.0.0.0/33"]', "key 'allow-client'"),
            ("upstream-ports = [0]", "key 'upstream-ports': 0 is not a port"),
            ('cache_dir = "/x"', "key 'cache_dir': unknown option (did you mean"),
            ("bogus = 1", "key 'bogus': unknown option"),
            ('config = "x.toml"', "key 'config': a config file cannot name another"),
            ("index-ttl = ", "not valid TOML"),
            (b"name = '\xff'", "not valid TOML"),
            ("rule = 5", "rule 1: must be a table"),
            ("[[rule]]\nttl = 5", "rule 1: key 'match': a regular expression"),
            ("[[rule]]\nmatch = '('\nttl = 5", "rule 1: key 'match': '(' is not a"),
            ("[[rule]]\nmatch = 'x'", "rule 1: key 'ttl' is required"),
            ("[[rule]]\nmatch = 'x'\nttl = 'often'", "rule 1: key 'ttl': 'often'"),
            ("[[rule]]\nmatch = 'x'\nttl = -1", "rule 1: key 'ttl': -1 is not"),
            ("[[rule]]\nmatch = 'x'\nttl = 1\nstore = 'no'", "rule 1: key 'store'"),
            (
                "[[rule]]\nmatch = 'x'\nttl = 1\n[[rule]]\nmatch = 'y'\nwhen = 1",
                "rule 2: unknown key 'when'",
            ),
        ]
        for text, problem in cases:
            path = self.write("bad.toml", text)
            message = self.parse_error("--config", path)
            self.assertTrue(message.startswith(f"config {path}: "), message)
            self.assertIn(problem, message)

    def test_bad_file_value_overridden(self) -> None:
        """A bad file value is refused even when the command line overrides it."""
        path = self.write("bad.toml", "index-ttl = -1")
        message = self.parse_error("--config", path, "--index-ttl=5")
        self.assertIn("key 'index-ttl'", message)

    def test_cache_dir_not_a_directory(self) -> None:
        """A cache dir that cannot be created is refused, naming --cache-dir."""
        blocker = self.write("file", "")
        message = self.parse_error(f"--cache-dir={blocker}/sub")
        self.assertTrue(message.startswith("--cache-dir: cannot create"), message)
        message = self.parse_error(f"--cache-dir={blocker}")
        self.assertTrue(message.startswith("--cache-dir: cannot create"), message)

    def test_cache_dir_from_file_not_a_directory(self) -> None:
        """A bad cache dir from the config file names the file and key."""
        blocker = self.write("file", "")
        path = self.write("c.toml", f'cache-dir = "{blocker}"')
        message = self.parse_error("--config", path)
        self.assertTrue(message.startswith(f"config {path}: key 'cache-dir'"))

    def test_default_cache_dir_not_a_directory(self) -> None:
        """A bad default cache dir names --cache-dir, even with a config file."""
        blocker = self.write("file", "")
        self.set_env("XDG_CACHE_HOME", blocker)
        path = self.write("c.toml", "index-ttl = 5")
        message = self.parse_error("--config", path)
        self.assertTrue(message.startswith("--cache-dir: cannot create"), message)

    def test_positional_arguments(self) -> None:
        """Stray arguments are refused."""
        self.parse_error("extra")


class PluginTests(_EnvMixin):
    """The twistd dropin and the service it makes."""

    def test_plugin_found(self) -> None:
        """getPlugins(IServiceMaker) finds ``cachingproxy`` wired to cachingproxy.tap."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("cachingproxy", makers)
        maker = makers["cachingproxy"]
        self.assertIs(maker.options, tap.Options)
        self.assertEqual(maker.makeService, tap.makeService)
        self.assertTrue(maker.description)

    def test_make_service(self) -> Deferred[object]:
        """makeService builds an IService from the parsed options that starts and
        stops cleanly."""
        options = tap.Options()
        options.parseOptions(
            ["--listen=tcp:0:interface=127.0.0.1", f"--cache-dir={self.tmp / 'c'}"]
        )
        service = tap.makeService(options)
        self.assertTrue(IService.providedBy(service))
        service.startService()
        stopped: Deferred[object] = maybeDeferred(service.stopService)
        return stopped


class TwistdTests(_EnvMixin):
    """The real ``twistd`` command line."""

    async def test_bad_option_exits_cleanly(self) -> None:
        """``twistd cachingproxy --max-size 12X`` exits non-zero naming --max-size,
        without a traceback."""
        result = await run_process(
            [*TWISTD, "-n", "cachingproxy", "--max-size", "12X"],
            env=checkout_env(),
            path=str(self.tmp),
            timeout=120,
        )
        output = result.output
        self.assertNotEqual(result.code, 0, output)
        self.assertIn("--max-size: '12X' is not a size", output)
        self.assertNotIn("Traceback", output)
