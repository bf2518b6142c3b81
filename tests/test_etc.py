"""The operations kit in ``etc/``: each file checked by the tool that reads it.

systemd units by ``systemd-analyze verify`` (in a scratch root, so the
machine's own units and binaries are not involved) and the socket-activation
set-up with a real twistd under ``systemd-socket-activate``; the OpenRC
script and its conf.d by ``sh -n`` and by evaluating them as openrc-run
would; the nftables file by ``nft -c -f`` and by loading it in a scratch
network namespace; the iptables script by running it there; the client
snippets by ``apt-config``, ``bash``, configparser. The command lines the
service files build are parsed by cachingproxy's own option parser. A check
whose tool is missing is skipped with the reason.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from cachingproxy.tap import Options

from .support import (
    REPO_ROOT,
    TWISTD,
    Child,
    NetnsUnavailable,
    ProcessResult,
    add_namespace,
    curl,
    etc_path,
    free_port,
    need,
    no_proxy_env,
    run,
    run_process,
    start_origin,
    with_defines,
)

SYSTEMD = ("cachingproxy.service", "cachingproxy.socket")
DROP_IN = os.path.join("cachingproxy.service.d", "socket-activation.conf")

MIRROR_HOSTS = (
    "10.200.9.9 mirror.test\n10.200.9.10 mirror.test\nfd00:200::9 mirror.test\n"
    "10.200.9.11 other.test\n"
)
"""Names for the scratch namespaces' hosts file: one with several addresses
of both families (as CDN-hosted mirrors have), one with a single address."""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


async def _ok(argv: list[str], **env: str) -> ProcessResult:
    result = await run_process(argv, env=no_proxy_env(**env), timeout=30)
    if result.code != 0:
        raise AssertionError(f"{argv!r} exited {result.code}:\n{result.output}")
    return result


def unit_entries(path: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting of a systemd unit file."""
    entries = []
    section = ""
    for raw in _read(path).splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_environment(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """The variables the ``Environment=`` lines set, in order."""
    env: dict[str, str] = {}
    for section, key, value in entries:
        if (section, key) == ("Service", "Environment"):
            for assignment in shlex.split(value):
                name, _, val = assignment.partition("=")
                env[name] = val
    return env


def expand_exec(command: str, env: dict[str, str]) -> list[str]:
    """argv of an ``ExecStart=`` line as systemd builds it: ``${NAME}`` is
    one word, a bare ``$NAME`` word is split on whitespace."""
    argv: list[str] = []
    for word in shlex.split(command):
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare:
            argv.extend(env.get(bare[1], "").split())
        else:
            argv.append(
                re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word)
            )
    return argv


def parse_proxy_args(test: TestCase, args: list[str]) -> Options:
    """``args`` (the options after ``cachingproxy``) parsed by the real option
    parser; the cache dir is swapped for a temporary one (parsing creates it)
    and /etc/cachingproxy.toml for the shipped example."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "/etc/cachingproxy.toml":
            args[i] = etc_path("cachingproxy.toml")
        if i and args[i - 1] == "--cache-dir":
            args[i] = os.path.abspath(test.mktemp())
    options = Options()
    options.parseOptions(args)
    return options


def split_twistd(test: TestCase, argv: list[str]) -> tuple[list[str], list[str]]:
    """twistd's own options and cachingproxy's, checking the command is
    ``twistd -n ... cachingproxy ...``."""
    test.assertTrue(argv[0].startswith("/"), argv)
    test.assertEqual(os.path.basename(argv[0]), "twistd", argv)
    test.assertIn("cachingproxy", argv)
    at = argv.index("cachingproxy")
    return argv[1:at], argv[at + 1 :]


class SystemdUnitTests(TestCase):
    """etc/systemd: the unit, the socket and the socket-activation drop-in."""

    def _entries(self) -> list[tuple[str, str, str]]:
        return unit_entries(etc_path("systemd", "cachingproxy.service"))

    def _root(self, units: dict[str, str]) -> str:
        """A scratch root for ``systemd-analyze verify --root``: the machine's
        system units, ``units`` (name → text) in /etc/systemd/system, and an
        executable stub for each program the unit's Exec*= lines run."""
        root = os.path.abspath(self.mktemp())
        for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
            if os.path.isdir(candidate):
                shutil.copytree(
                    candidate,
                    os.path.join(root, "usr/lib/systemd/system"),
                    symlinks=True,
                )
                break
        else:
            raise SkipTest("no system unit directory to verify against")
        for name, text in units.items():
            path = os.path.join(root, "etc/systemd/system", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        # Stubs for the programs the Exec*= lines run (verify checks they exist).
        for _, key, value in self._entries():
            if key.startswith("Exec"):
                stub = os.path.join(root, shlex.split(value)[0].lstrip("/"))
                os.makedirs(os.path.dirname(stub), exist_ok=True)
                with open(stub, "w") as f:
                    f.write("#!/bin/sh\n")
                os.chmod(stub, 0o755)
        return root

    async def _verify(self, units: dict[str, str], *names: str) -> ProcessResult:
        need("systemd-analyze")
        root = self._root(units)
        return await run_process(
            [
                "systemd-analyze",
                "verify",
                "--man=no",
                "--generators=no",
                f"--root={root}",
                *names,
            ],
            env=no_proxy_env(SYSTEMD_LOG_COLOR="0"),
            timeout=30,
        )

    def test_verify_service(self) -> defer.Deferred[None]:
        """``systemd-analyze verify`` accepts the service with no warning."""

        async def check() -> None:
            text = _read(etc_path("systemd", "cachingproxy.service"))
            result = await self._verify(
                {"cachingproxy.service": text}, "cachingproxy.service"
            )
            self.assertEqual((result.code, result.output), (0, ""))

        return run(check())

    def test_verify_socket_activation(self) -> defer.Deferred[None]:
        """The socket, the service and its socket-activation drop-in verify
        together with no warning."""

        async def check() -> None:
            units = {
                name: _read(etc_path("systemd", name)) for name in (*SYSTEMD, DROP_IN)
            }
            result = await self._verify(units, *SYSTEMD)
            self.assertEqual((result.code, result.output), (0, ""))

        return run(check())

    def test_verify_catches_mistakes(self) -> defer.Deferred[None]:
        """The checker is not a rubber stamp: a misspelt key in the shipped
        unit is reported."""

        async def check() -> None:
            text = _read(etc_path("systemd", "cachingproxy.service"))
            broken = text.replace("NoNewPrivileges=", "NoNewPrivilege=")
            self.assertNotEqual(broken, text)
            result = await self._verify(
                {"cachingproxy.service": broken}, "cachingproxy.service"
            )
            self.assertIn("NoNewPrivilege", result.output)

        return run(check())

    def test_exec_start(self) -> None:
        """ExecStart runs ``twistd -n --pidfile= cachingproxy`` with options the
        real parser accepts: the cache in /var/cache/cachingproxy (the
        CacheDirectory=), listening on LISTEN, the config file from OPTS."""
        entries = self._entries()
        settings = {(s, k): v for s, k, v in entries}
        argv = expand_exec(settings["Service", "ExecStart"], unit_environment(entries))
        twistd, proxy = split_twistd(self, argv)
        self.assertIn("-n", twistd)
        self.assertIn("--pidfile=", twistd)
        self.assertEqual(
            proxy[proxy.index("--cache-dir") + 1], "/var/cache/cachingproxy"
        )
        config = parse_proxy_args(self, proxy).proxy_config
        self.assertEqual(config.listen, ("tcp:3128",))
        self.assertEqual(settings["Service", "CacheDirectory"], "cachingproxy")

    def test_hardening(self) -> None:
        """The service runs as an unprivileged user in a read-only system,
        without new privileges, and with no capability while it listens on a
        port above 1024 (AmbientCapabilities= is only suggested, commented)."""
        entries = self._entries()
        settings = {(s, k): v for s, k, v in entries}
        self.assertEqual(settings["Service", "ProtectSystem"], "strict")
        self.assertEqual(settings["Service", "NoNewPrivileges"], "yes")
        self.assertEqual(settings["Service", "User"], "cachingproxy")
        self.assertEqual(settings["Service", "CapabilityBoundingSet"], "")
        self.assertNotIn(("Service", "AmbientCapabilities"), settings)
        port = int(unit_environment(entries)["LISTEN"].split(":")[1])
        self.assertGreaterEqual(port, 1024)
        self.assertIn(
            "#AmbientCapabilities=CAP_NET_BIND_SERVICE",
            _read(etc_path("systemd", "cachingproxy.service")),
        )

    def test_socket_activation_drop_in(self) -> None:
        """The drop-in makes the service adopt the socket's first (IPv4)
        ListenStream= as ``--listen systemd:domain=INET:index=0``."""
        drop_in = unit_entries(etc_path("systemd", DROP_IN))
        socket_unit = unit_entries(etc_path("systemd", "cachingproxy.socket"))
        streams = [v for s, k, v in socket_unit if (s, k) == ("Socket", "ListenStream")]
        self.assertEqual(len(streams), 1)
        self.assertRegex(streams[0], r"^\d+\.\d+\.\d+\.\d+:\d+$")
        service = unit_entries(etc_path("systemd", "cachingproxy.service"))
        env = unit_environment(service + drop_in)
        self.assertEqual(env["LISTEN"], "systemd:domain=INET:index=0")
        self.assertIn(("Unit", "Requires", "cachingproxy.socket"), drop_in)

    def test_socket_activated_twistd_serves(self) -> defer.Deferred[None]:
        """With the drop-in's LISTEN, a real twistd started by
        ``systemd-socket-activate`` (an inherited, already bound socket, as
        systemd hands over) serves through the cache: MISS, then HIT."""
        return run(self._socket_activated())

    async def _socket_activated(self) -> None:
        need("systemd-socket-activate", "curl")
        env = unit_environment(
            unit_entries(etc_path("systemd", "cachingproxy.service"))
            + unit_entries(etc_path("systemd", DROP_IN))
        )
        origin, oport = start_origin(self)
        body = os.urandom(100_000)
        origin.static("/pkg-1.0.tar.gz", body)
        port = free_port()
        cwd = self.mktemp()
        os.makedirs(cwd)
        activator = Child(
            self,
            [
                "systemd-socket-activate",
                "--listen",
                f"127.0.0.1:{port}",
                # systemd always names the sockets it passes (LISTEN_FDNAMES).
                "--fdname=cachingproxy",
                "-E",
                f"PYTHONPATH={REPO_ROOT}",
                *TWISTD,
                "-n",
                "--pidfile=",
                "cachingproxy",
                "--listen",
                env["LISTEN"],
                "--cache-dir",
                os.path.abspath(self.mktemp()),
                "--allow-upstream",
                "127.0.0.1",
            ],
            env=no_proxy_env(),
            path=cwd,
        )
        # It binds the socket, then waits for the first connection.
        await activator.wait_for_text(f"Listening on 127.0.0.1:{port}")
        url = f"http://127.0.0.1:{oport}/pkg-1.0.tar.gz"
        seen = []
        for _ in range(2):
            # The first connection makes systemd-socket-activate start twistd,
            # which then accepts it: --max-time covers the start-up.
            result = await curl(url, proxy=port, out=self.mktemp())
            self.assertEqual(result.code, 0, result.output)
            self.assertEqual(result.body, body)
            seen.append(result.headers.get("x-cache"))
        self.assertEqual(seen, ["MISS", "HIT"])
        self.assertEqual(origin.count("/pkg-1.0.tar.gz"), 1)


_OPENRC_HARNESS = """
RC_SVCNAME=cachingproxy
. "$1"
. "$2"
for f in depend start_pre reload; do command -v "$f" >/dev/null || exit 3; done
printf 'command=%s\\n' "$command"
printf 'command_user=%s\\n' "$command_user"
printf 'command_background=%s\\n' "$command_background"
printf 'pidfile=%s\\n' "$pidfile"
printf 'capabilities=%s\\n' "${capabilities-}"
eval "set -- $command_args"
for arg; do printf 'arg=%s\\n' "$arg"; done
"""
"""Sources conf.d then the init script as openrc-run does, and prints what
start-stop-daemon would be given (command_args split by ``eval``, as
openrc-run does)."""


class OpenRCTests(TestCase):
    """etc/openrc: the init script and its conf.d."""

    init = etc_path("openrc", "init.d", "cachingproxy")
    conf = etc_path("openrc", "conf.d", "cachingproxy")

    def test_syntax(self) -> defer.Deferred[None]:
        """Both files parse as POSIX sh (openrc-run scripts are sh) and bash,
        and the init script starts with the openrc-run shebang."""

        async def check() -> None:
            for shell in ("sh", "bash"):
                if shutil.which(shell):
                    for path in (self.init, self.conf):
                        await _ok([shell, "-n", path])
            self.assertTrue(_read(self.init).startswith("#!/sbin/openrc-run\n"))
            self.assertTrue(os.access(self.init, os.X_OK))

        return run(check())

    def test_shellcheck(self) -> defer.Deferred[None]:
        """shellcheck finds nothing (SC2034, variables only openrc-run reads,
        excepted)."""

        async def check() -> None:
            need("shellcheck")
            await _ok(["shellcheck", "-s", "sh", "-e", "SC2034", self.init])
            await _ok(["shellcheck", "-s", "sh", self.conf])

        return run(check())

    async def _evaluate(self, settings: str = "") -> tuple[dict[str, str], list[str]]:
        """Run the harness with ``settings`` appended to conf.d."""
        conf = os.path.abspath(self.mktemp())
        with open(conf, "w") as f:
            f.write(_read(self.conf) + settings)
        result = await _ok(["sh", "-c", _OPENRC_HARNESS, "harness", conf, self.init])
        values: dict[str, str] = {}
        args = []
        for line in result.out.decode().splitlines():
            key, _, value = line.partition("=")
            if key == "arg":
                args.append(value)
            else:
                values[key] = value
        return values, args

    def test_defaults(self) -> defer.Deferred[None]:
        """With conf.d as shipped: /usr/bin/twistd -n --pidfile= ... cachingproxy
        as cachingproxy:cachingproxy, backgrounded by start-stop-daemon with a
        pid file, cache in /var/cache/cachingproxy, on tcp:3128, no capability;
        the options parse."""

        async def check() -> None:
            values, args = await self._evaluate()
            self.assertEqual(values["command"], "/usr/bin/twistd")
            self.assertEqual(values["command_user"], "cachingproxy:cachingproxy")
            self.assertEqual(values["command_background"], "yes")
            self.assertEqual(values["pidfile"], "/run/cachingproxy.pid")
            self.assertEqual(values["capabilities"], "")
            twistd, proxy = split_twistd(self, [values["command"], *args])
            self.assertIn("-n", twistd)
            self.assertIn("--pidfile=", twistd)
            self.assertEqual(
                proxy[proxy.index("--cache-dir") + 1], "/var/cache/cachingproxy"
            )
            config = parse_proxy_args(self, proxy).proxy_config
            self.assertEqual(config.listen, ("tcp:3128",))

        return run(check())

    def test_knobs(self) -> defer.Deferred[None]:
        """CACHINGPROXY_USER/GROUP, CACHE_DIR, LISTEN (several endpoints),
        OPTS and TWISTD set in conf.d reach the command line; a port below
        1024 adds the bind capability."""

        async def check() -> None:
            values, args = await self._evaluate(
                'CACHINGPROXY_USER="proxy"\nCACHINGPROXY_GROUP="nogroup"\n'
                'CACHE_DIR="/srv/cache"\nLISTEN="tcp:80 tcp:port=3129"\n'
                'OPTS="--max-size 1G --config /etc/cachingproxy.toml"\n'
                'TWISTD="/opt/cachingproxy/bin/twistd"\n'
            )
            self.assertEqual(values["command"], "/opt/cachingproxy/bin/twistd")
            self.assertEqual(values["command_user"], "proxy:nogroup")
            self.assertEqual(values["capabilities"], "^cap_net_bind_service")
            _, proxy = split_twistd(self, [values["command"], *args])
            self.assertEqual(proxy[proxy.index("--cache-dir") + 1], "/srv/cache")
            config = parse_proxy_args(self, proxy).proxy_config
            self.assertEqual(config.listen, ("tcp:80", "tcp:port=3129"))
            self.assertEqual(config.max_size, 1024**3)

        return run(check())

    def test_conf_d_shows_the_defaults(self) -> None:
        """Every ``#VAR="value"`` first shown in conf.d is the init script's
        default for VAR, and every knob of the init script is in conf.d."""
        shown: dict[str, str] = {}
        for name, value in re.findall(r'(?m)^#([A-Z_]+)="([^"]*)"$', _read(self.conf)):
            shown.setdefault(name, value)
        defaults = dict(
            re.findall(r'(?m)^: "\$\{([A-Z_]+):=([^}]*)\}"$', _read(self.init))
        )
        self.assertEqual(
            set(defaults),
            {
                "CACHINGPROXY_USER",
                "CACHINGPROXY_GROUP",
                "CACHE_DIR",
                "LISTEN",
                "OPTS",
                "TWISTD",
                "LOG_FILE",
            },
        )
        self.assertEqual(set(shown), set(defaults))
        for name, value in defaults.items():
            if name != "OPTS":
                self.assertEqual(shown[name], value, name)


async def _scratch_namespace(test: TestCase) -> str:
    """A namespace with MIRROR_HOSTS and an interface with addresses of both
    families (getaddrinfo, hence getent ahosts, lists only the families a
    host has addresses of)."""
    try:
        name = await add_namespace(test, "s", MIRROR_HOSTS)
    except NetnsUnavailable as e:
        raise SkipTest(str(e)) from None
    await _ok(
        [
            "sh",
            "-ec",
            f"ip -n {name} link add lan0 type veth peer name lan1\n"
            f"ip -n {name} addr add 10.200.9.1/24 dev lan0\n"
            f"ip -n {name} addr add fd00:200::1/64 dev lan0 nodad\n"
            f"ip -n {name} link set lan0 up\n"
            f"ip -n {name} link set lan1 up\n",
        ]
    )
    return name


def _netns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


class NftablesTests(TestCase):
    """etc/nftables: the interception ruleset and its mirrors helper."""

    nft_file = etc_path("nftables", "transparent.nft")
    mirrors = etc_path("nftables", "transparent-mirrors.sh")

    def _rules(self) -> str:
        """The ruleset with the proxy user set to root: the only edit it needs
        here (nft resolves the user name, and there is no cachingproxy user)."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(with_defines(_read(self.nft_file), PROXY_USER='"root"'))
        return path

    def test_helper_syntax(self) -> defer.Deferred[None]:
        """transparent-mirrors.sh parses as sh, and shellcheck (if installed)
        finds nothing."""

        async def check() -> None:
            await _ok(["sh", "-n", self.mirrors])
            if shutil.which("shellcheck"):
                await _ok(["shellcheck", "-s", "sh", self.mirrors])

        return run(check())

    def test_check_load_and_variants(self) -> defer.Deferred[None]:
        """``nft -c -f`` accepts the file; loaded twice it leaves one table
        that intercepts all port-80 traffic, with the proxy user's own traffic
        returned before any redirect; transparent-mirrors.sh then narrows the
        sets to exactly the listed hosts' addresses (all of a name's several
        addresses, both families), and an unresolvable name changes nothing."""
        return run(self._check_load_and_variants())

    async def _check_load_and_variants(self) -> None:
        need("nft")
        ns = await _scratch_namespace(self)
        rules = self._rules()
        await _ok(_netns(ns, "nft", "-c", "-f", rules))
        await _ok(_netns(ns, "nft", "-f", rules))
        await _ok(_netns(ns, "nft", "-f", rules))
        listing = (await _ok(_netns(ns, "nft", "list", "ruleset"))).out.decode()
        self.assertEqual(listing.count("table inet cachingproxy"), 1)
        self.assertIn("0.0.0.0/0", listing)
        self.assertIn("::/0", listing)
        output = listing[listing.index("chain output") :]
        self.assertLess(
            output.index("meta skuid 0 return"), output.index("redirect to :3128")
        )
        self.assertIn('iifname "lan0" ip daddr @intercept4 tcp dport 80', listing)

        async def elements() -> tuple[set[str], set[str]]:
            found = []
            for set_name in ("intercept4", "intercept6"):
                text = (
                    await _ok(
                        _netns(
                            ns, "nft", "list", "set", "inet", "cachingproxy", set_name
                        )
                    )
                ).out.decode()
                inside = re.search(r"elements = \{([^}]*)\}", text)
                found.append(
                    {e.strip() for e in inside[1].split(",")} if inside else set()
                )
            return found[0], found[1]

        await _ok(_netns(ns, "sh", self.mirrors, "mirror.test", "other.test"))
        self.assertEqual(
            await elements(),
            ({"10.200.9.9", "10.200.9.10", "10.200.9.11"}, {"fd00:200::9"}),
        )
        failed = await run_process(
            _netns(ns, "sh", self.mirrors, "other.test", "nowhere.test"), timeout=30
        )
        self.assertNotEqual(failed.code, 0)
        self.assertIn("nowhere.test", failed.output)
        self.assertEqual(
            await elements(),
            ({"10.200.9.9", "10.200.9.10", "10.200.9.11"}, {"fd00:200::9"}),
        )


class IptablesTests(TestCase):
    """etc/iptables/transparent.sh: both variants and stop."""

    script = etc_path("iptables", "transparent.sh")

    def test_syntax(self) -> defer.Deferred[None]:
        """The script parses as sh, and shellcheck (if installed) finds nothing."""

        async def check() -> None:
            await _ok(["sh", "-n", self.script])
            if shutil.which("shellcheck"):
                await _ok(["shellcheck", "-s", "sh", self.script])

        return run(check())

    def test_variants(self) -> defer.Deferred[None]:
        """``all`` redirects every LAN port-80 connection and the router's own
        except the proxy user's; ``mirrors`` only the listed hosts' addresses
        (IPv4 and IPv6); running it again replaces the rules rather than adding
        to them; ``stop`` removes everything it added."""
        return run(self._variants())

    async def _variants(self) -> None:
        need("iptables", "iptables-save")
        ns = await _scratch_namespace(self)
        env = {"LAN_IF": "lan0", "PROXY_PORT": "3129", "PROXY_USER": "root"}
        has_ip6 = shutil.which("ip6tables") is not None
        if not has_ip6:
            env["IP6TABLES"] = ""

        async def nat(save: str = "iptables-save") -> list[str]:
            out = (await _ok(_netns(ns, save, "-t", "nat"))).out.decode()
            return [line for line in out.splitlines() if line.startswith("-A")]

        await _ok(_netns(ns, "sh", self.script, "all"), **env)
        await _ok(_netns(ns, "sh", self.script, "all"), **env)
        rules = await nat()
        self.assertEqual(
            [r for r in rules if r.startswith(("-A PREROUTING", "-A OUTPUT"))],
            [
                "-A PREROUTING -i lan0 -p tcp -m tcp --dport 80 -j CACHINGPROXY_PRE",
                "-A OUTPUT -p tcp -m tcp --dport 80 -j CACHINGPROXY_OUT",
            ],
        )
        out = [r for r in rules if r.startswith("-A CACHINGPROXY_OUT")]
        self.assertEqual(out[0], "-A CACHINGPROXY_OUT -m owner --uid-owner 0 -j RETURN")
        self.assertIn("-A CACHINGPROXY_PRE -p tcp -j REDIRECT --to-ports 3129", rules)

        await _ok(
            _netns(ns, "sh", self.script, "mirrors", "mirror.test", "other.test"), **env
        )
        rules = await nat()
        redirected = sorted(
            r.split()[3] for r in rules if r.startswith("-A CACHINGPROXY_PRE -d")
        )
        self.assertEqual(
            redirected, ["10.200.9.10/32", "10.200.9.11/32", "10.200.9.9/32"]
        )
        self.assertEqual(sum(r.startswith("-A PREROUTING") for r in rules), 1)
        if has_ip6:
            rules6 = await nat("ip6tables-save")
            self.assertIn(
                "-A CACHINGPROXY_PRE -d fd00:200::9/128 -p tcp -j REDIRECT --to-ports 3129",
                rules6,
            )

        await _ok(_netns(ns, "sh", self.script, "stop"), **env)
        self.assertEqual(await nat(), [])


class ClientSnippetTests(TestCase):
    """etc/clients: the apt, Portage, pip and npm snippets."""

    def test_apt(self) -> defer.Deferred[None]:
        """apt reads the apt.conf.d snippet: http through the proxy, https
        direct."""

        async def check() -> None:
            need("apt-config")
            empty = os.path.abspath(self.mktemp())
            os.makedirs(empty)
            isolated = os.path.abspath(self.mktemp())
            with open(isolated, "w") as f:
                f.write(f'Dir::Etc::Parts "{empty}";\nDir::Etc::Main "/dev/null";\n')
            result = await _ok(
                [
                    "apt-config",
                    "-c",
                    etc_path("clients", "apt", "01cachingproxy"),
                    "dump",
                ],
                APT_CONFIG=isolated,
            )
            dump = result.out.decode()
            self.assertIn(
                'Acquire::http::Proxy "http://cache.example.net:3128/";', dump
            )
            self.assertIn('Acquire::https::Proxy "DIRECT";', dump)

        return run(check())

    def test_portage(self) -> defer.Deferred[None]:
        """make.conf parses as bash (Portage sources it) and sets an http://
        GENTOO_MIRRORS and http_proxy."""

        async def check() -> None:
            need("bash")
            path = etc_path("clients", "portage", "make.conf")
            result = await _ok(
                [
                    "bash",
                    "-euc",
                    '. "$1"; printf "%s\\n" "$GENTOO_MIRRORS" "$http_proxy"',
                    "make.conf",
                    path,
                ]
            )
            mirrors, proxy = result.out.decode().splitlines()
            self.assertTrue(mirrors.startswith("http://"), mirrors)
            self.assertEqual(proxy, "http://cache.example.net:3128")

        return run(check())

    def test_pip(self) -> None:
        """pip.conf is INI with an index on the proxy and that host trusted
        (plain http on the LAN)."""
        parser = configparser.ConfigParser()
        parser.read(etc_path("clients", "pip", "pip.conf"))
        index = parser["global"]["index-url"]
        self.assertRegex(index, r"^http://cache\.example\.net:3128/.+/simple/$")
        self.assertEqual(parser["global"]["trusted-host"], "cache.example.net")

    def test_npm(self) -> None:
        """.npmrc is key=value lines (``;`` comments) with the registry on the
        proxy."""
        settings = {}
        for line in _read(etc_path("clients", "npm", ".npmrc")).splitlines():
            line = line.strip()
            if line and not line.startswith((";", "#")):
                key, sep, value = line.partition("=")
                self.assertTrue(sep, line)
                settings[key.strip()] = value.strip()
        self.assertEqual(settings, {"registry": "http://cache.example.net:3128/npm/"})


class CommentedTests(TestCase):
    """Every file of the kit opens with comments for the operator."""

    def test_every_file_opens_with_comments(self) -> None:
        """Each etc/ file starts (after a shebang) with a comment saying what
        it is and how to install it."""
        found = []
        for directory, _, files in os.walk(os.path.join(REPO_ROOT, "etc")):
            for name in files:
                path = os.path.join(directory, name)
                lines = _read(path).splitlines()
                if lines and lines[0].startswith("#!"):
                    lines = lines[1:]
                if name.endswith(".xml"):
                    # XML: one <!-- ... --> block of several lines first.
                    end = next(i for i, x in enumerate(lines) if "-->" in x)
                    self.assertTrue(lines[0].startswith("<!--") and end >= 2, path)
                    found.append(os.path.relpath(path, REPO_ROOT))
                    continue
                comments = [line for line in lines if line.startswith(("#", "//", ";"))]
                self.assertTrue(
                    lines and lines[0] in comments and len(comments) >= 2,
                    f"{path} does not open with comments",
                )
                found.append(os.path.relpath(path, REPO_ROOT))
        self.assertGreaterEqual(len(found), 12, found)


class SysusersTests(TestCase):
    """etc/systemd/sysusers.d/cachingproxy.conf: the system user, made the
    way distributions make one, is the user the unit and the firewall name."""

    CONF = ("systemd", "sysusers.d", "cachingproxy.conf")

    def test_systemd_sysusers_makes_the_user(self) -> defer.Deferred[None]:
        """``systemd-sysusers --root`` on a scratch root creates the
        ``cachingproxy`` user and group: a system id, home
        /var/cache/cachingproxy (the unit's cache), no login shell."""

        async def check() -> None:
            need("systemd-sysusers")
            root = os.path.abspath(self.mktemp())
            os.makedirs(os.path.join(root, "etc"))
            for name in ("passwd", "group", "shadow", "gshadow"):
                with open(os.path.join(root, "etc", name), "w"):
                    pass
            await _ok(["systemd-sysusers", f"--root={root}", etc_path(*self.CONF)])
            passwd = _read(os.path.join(root, "etc", "passwd")).splitlines()
            (entry,) = [line.split(":") for line in passwd]
            name, _, uid, gid, _, home, shell = entry
            self.assertEqual(name, "cachingproxy")
            self.assertLess(int(uid), 1000)
            self.assertEqual(
                (home, shell), ("/var/cache/cachingproxy", "/usr/sbin/nologin")
            )
            group = _read(os.path.join(root, "etc", "group")).split(":")
            self.assertEqual((group[0], group[2]), ("cachingproxy", gid))

        return run(check())

    def test_same_user_everywhere(self) -> None:
        """The unit's User=/Group=, the nftables ruleset's PROXY_USER and the
        iptables script's default name the user the sysusers file makes, and
        the unit's install steps use the sysusers file."""
        users = [
            line.split()[1]
            for line in _read(etc_path(*self.CONF)).splitlines()
            if line.startswith("u ")
        ]
        self.assertEqual(users, ["cachingproxy"])
        settings = {
            (s, k): v
            for s, k, v in unit_entries(etc_path("systemd", "cachingproxy.service"))
        }
        self.assertEqual(settings["Service", "User"], users[0])
        self.assertEqual(settings["Service", "Group"], users[0])
        nft = _read(etc_path("nftables", "transparent.nft"))
        self.assertIn(f'define PROXY_USER = "{users[0]}"', nft)
        self.assertIn("[cachingproxy]", _read(etc_path("iptables", "transparent.sh")))
        unit = _read(etc_path("systemd", "cachingproxy.service"))
        self.assertIn("sysusers.d/cachingproxy.conf", unit)
        self.assertNotIn("useradd", unit)
