"""Per-ecosystem part of ``bench/bench_pip.py --ecosystems``: each
ecosystem's own client, through its preset, cold and warm, against the
client installing from a local directory.

For each ecosystem a registry of ``count`` packages of ``size`` random bytes
each is built in its own layout (the builders of tests/registries.py), served
by ``twist web`` from that directory on 127.0.0.1, and mounted in a real
``twistd cachingproxy --mirror PRESET --mirror PREFIX=ORIGIN`` (the preset's
protocol kept, the upstream swapped):

* cold  -- through the cache, empty cache, the client's own cache empty;
* warm  -- through the cache with the origin stopped (everything from the
  cache), the client's own cache empty again;
* floor -- the client installing from the local directory, no HTTP at all
  (``pip --find-links``, ``GOPROXY=file://``, a cargo ``local-registry``,
  ``gem install --local``, apt with a ``file:`` source).

One run each; wall-clock seconds of the client process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import free_port, wait_listening

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.registries import (  # noqa: E402
    RUBY_INDEX,
    compact_index,
    crate,
    gemspec,
    go_module,
)
from tests.support import build_wheel  # noqa: E402

TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower()
        and not k.upper().startswith(("PIP_", "UV_", "GO", "CARGO_", "BUNDLE_", "GEM_"))
    }
    env.update(extra)
    return env


def _timed(argv: list[str], env: dict[str, str], cwd: str | None = None) -> float:
    started = time.monotonic()
    done = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(
            f"{argv!r} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return elapsed


def _fresh(tmp: str, name: str) -> str:
    return tempfile.mkdtemp(dir=tmp, prefix=f"{name}-")


class Ecosystem:
    """One ecosystem: how to build its registry and run its client."""

    name = ""
    tool = ""
    mirrors: tuple[str, ...] = ()
    """``--mirror`` values: the preset, then its prefixes over the origin
    (``{origin}`` is replaced)."""

    def __init__(self, tmp: str, count: int, size: int) -> None:
        self.tmp = tmp
        self.count = count
        self.size = size
        self.root = _fresh(tmp, f"{self.name}-registry")

    def build(self, origin: str) -> None:
        raise NotImplementedError

    def client(self, cache: str) -> float:
        """The client against the cache at ``cache`` (``http://127.0.0.1:P``)."""
        raise NotImplementedError

    def floor(self) -> float:
        raise NotImplementedError


class Pip(Ecosystem):
    name, tool = "pip", sys.executable
    mirrors = ("pypi", "/pypi/={origin}")

    def build(self, origin: str) -> None:
        self.projects = []
        self.wheels = _fresh(self.tmp, "wheels")
        html = []
        for i in range(self.count):
            project = f"bench-pkg-{i:02d}"
            name, data = build_wheel(
                project,
                "1.0",
                files={f"bench_pkg_{i:02d}/payload.bin": os.urandom(self.size)},
            )
            for where in (self.wheels, os.path.join(self.root, "packages")):
                os.makedirs(where, exist_ok=True)
                with open(os.path.join(where, name), "wb") as f:
                    f.write(data)
            page = os.path.join(self.root, "simple", project, "index.html")
            os.makedirs(os.path.dirname(page))
            with open(page, "w") as f:
                f.write(
                    f'<html><body><a href="/packages/{name}">{name}</a></body></html>\n'
                )
            html.append(project)
            self.projects.append(project)

    def _pip(self, *source: str) -> float:
        target = _fresh(self.tmp, "target")
        argv = [self.tool, "-m", "pip", "install", "--quiet", "--no-cache-dir"]
        argv += ["--no-deps", "--target", target, *source, *self.projects]
        return _timed(
            argv, _env(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
        )

    def client(self, cache: str) -> float:
        return self._pip("--index-url", f"{cache}/pypi/simple/")

    def floor(self) -> float:
        return self._pip("--no-index", "--find-links", self.wheels)


class Go(Ecosystem):
    name, tool = "go", "go"
    mirrors = ("go", "/go/={origin}")

    def build(self, origin: str) -> None:
        self.app = _fresh(self.tmp, "goapp")
        requires = []
        for i in range(self.count):
            module = f"example.com/m{i:02d}"
            go_module(self.root, module, "v1.0.0", {}, os.urandom(self.size))
            requires.append(f"\t{module} v1.0.0\n")
        with open(os.path.join(self.app, "go.mod"), "w") as f:
            f.write(
                "module bench.local/app\n\ngo 1.19\n\nrequire (\n"
                + "".join(requires)
                + ")\n"
            )

    def _go(self, goproxy: str) -> float:
        home = _fresh(self.tmp, "gohome")
        try:
            return _timed(
                [self.tool, "mod", "download", "all"],
                _env(
                    HOME=home,
                    GOPATH=os.path.join(home, "go"),
                    GOMODCACHE=os.path.join(home, "mod"),
                    GOCACHE=os.path.join(home, "cache"),
                    GOPROXY=goproxy,
                    GOSUMDB="off",
                    GOFLAGS="-mod=mod",
                    GOTOOLCHAIN="local",
                ),
                cwd=self.app,
            )
        finally:
            subprocess.run(["chmod", "-R", "u+w", home], check=False)
            shutil.rmtree(home, ignore_errors=True)
            go_sum = os.path.join(self.app, "go.sum")
            if os.path.exists(go_sum):
                os.remove(go_sum)

    def client(self, cache: str) -> float:
        return self._go(f"{cache}/go/")

    def floor(self) -> float:
        return self._go(f"file://{self.root}")


class Cargo(Ecosystem):
    name, tool = "cargo", "cargo"
    mirrors = ("crates", "/crates/={origin}index/", "/crates-dl/={origin}dl/")

    def build(self, origin: str) -> None:
        index, files = os.path.join(self.root, "index"), os.path.join(self.root, "dl")
        self.local = _fresh(self.tmp, "cargo-local")
        deps = []
        for i in range(self.count):
            name = f"bench{i:02d}"
            data = crate(index, files, name, "1.0.0", {}, os.urandom(self.size))
            with open(os.path.join(self.local, f"{name}-1.0.0.crate"), "wb") as f:
                f.write(data)
            deps.append(f'{name} = "1.0"\n')
        shutil.copytree(index, os.path.join(self.local, "index"))
        with open(os.path.join(index, "config.json"), "w") as f:
            f.write(f'{{"dl": "{origin}dl", "api": "{origin}"}}')
        self.app = _fresh(self.tmp, "cargoapp")
        os.makedirs(os.path.join(self.app, "src"))
        with open(os.path.join(self.app, "src", "main.rs"), "w") as f:
            f.write("fn main() {}\n")
        with open(os.path.join(self.app, "Cargo.toml"), "w") as f:
            f.write(
                '[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n'
                + "".join(deps)
            )

    def _cargo(self, source: str) -> float:
        home = _fresh(self.tmp, "cargohome")
        with open(os.path.join(home, "config.toml"), "w") as f:
            f.write(
                f'[source.crates-io]\nreplace-with = "x"\n\n[source.x]\n{source}\n\n[net]\nretry = 0\n'
            )
        try:
            return _timed([self.tool, "fetch"], _env(CARGO_HOME=home), cwd=self.app)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            lock = os.path.join(self.app, "Cargo.lock")
            if os.path.exists(lock):
                os.remove(lock)

    def client(self, cache: str) -> float:
        return self._cargo(f'registry = "sparse+{cache}/crates/"')

    def floor(self) -> float:
        return self._cargo(f'local-registry = "{self.local}"')


class Gem(Ecosystem):
    name, tool = "gem", "gem"
    mirrors = ("rubygems", "/rubygems/={origin}")

    def build(self, origin: str) -> None:
        gems: dict[str, tuple[str, dict[str, str], bytes]] = {}
        self.local = _fresh(self.tmp, "gems-local")
        for d in ("gems", "quick/Marshal.4.8", "info"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.names = []
        for i in range(self.count):
            name = f"benchgem{i:02d}"
            src = _fresh(self.tmp, "gemsrc")
            os.makedirs(os.path.join(src, "lib"))
            with open(os.path.join(src, "lib", f"{name}.rb"), "w") as f:
                f.write(f"# {name}\n")
            with open(os.path.join(src, "lib", "payload.bin"), "wb") as f:
                f.write(os.urandom(self.size))
            with open(os.path.join(src, f"{name}.gemspec"), "w") as f:
                f.write(gemspec(name, "1.0.0", {}, ("lib/payload.bin",)))
            _timed(["gem", "build", f"{name}.gemspec"], _env(), cwd=src)
            gem = os.path.join(src, f"{name}-1.0.0.gem")
            with open(gem, "rb") as f:
                gems[name] = ("1.0.0", {}, f.read())
            for where in (os.path.join(self.root, "gems"), self.local):
                shutil.copy(gem, where)
            self.names.append(name)
        for path, body in compact_index(gems).items():
            with open(os.path.join(self.root, path), "wb") as f:
                f.write(body)
        specs = [
            os.path.join(self.root, "gems", n)
            for n in sorted(os.listdir(os.path.join(self.root, "gems")))
        ]
        _timed(["ruby", "-e", RUBY_INDEX, self.root, *specs], _env())

    def _gem(self, *args: str, cwd: str | None = None) -> float:
        home = _fresh(self.tmp, "gemhome")
        try:
            return _timed(
                [self.tool, "install", "--no-document", *args, *self.names],
                _env(
                    HOME=home,
                    GEM_HOME=os.path.join(home, "g"),
                    GEM_SPEC_CACHE=os.path.join(home, "s"),
                ),
                cwd=cwd,
            )
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def client(self, cache: str) -> float:
        return self._gem("--clear-sources", "--source", f"{cache}/rubygems/")

    def floor(self) -> float:
        return self._gem("--local", cwd=self.local)


class Apt(Ecosystem):
    name, tool = "apt", "apt-get"
    mirrors = ("debian", "/debian/={origin}")

    def build(self, origin: str) -> None:
        arch = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.arch, self.packages = arch, []
        for i in range(self.count):
            name = f"bench-deb-{i:02d}"
            src = _fresh(self.tmp, "debsrc")
            os.makedirs(os.path.join(src, "DEBIAN"))
            with open(os.path.join(src, "DEBIAN", "control"), "w") as f:
                f.write(
                    f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
                    "Maintainer: bench <bench@example.invalid>\nDescription: bench\n"
                )
            os.makedirs(os.path.join(src, "usr", "share", name))
            with open(os.path.join(src, "usr", "share", name, "data"), "wb") as f:
                f.write(os.urandom(self.size))
            pool = os.path.join(self.root, "pool", "main", "b", name)
            os.makedirs(pool)
            _timed(
                [
                    "dpkg-deb",
                    "--root-owner-group",
                    "-Znone",
                    "--build",
                    src,
                    os.path.join(pool, f"{name}_1.0_all.deb"),
                ],
                _env(),
            )
            self.packages.append(name)
        binary = os.path.join(self.root, "dists", "stable", "main", f"binary-{arch}")
        os.makedirs(binary)
        packages = subprocess.run(
            ["apt-ftparchive", "packages", "pool"],
            cwd=self.root,
            capture_output=True,
            check=True,
        ).stdout
        with open(os.path.join(binary, "Packages"), "wb") as f:
            f.write(packages)
        release = subprocess.run(
            [
                "apt-ftparchive",
                "-o",
                "APT::FTPArchive::Release::Suite=stable",
                "-o",
                f"APT::FTPArchive::Release::Architectures={arch}",
                "-o",
                "APT::FTPArchive::Release::Components=main",
                "release",
                ".",
            ],
            cwd=os.path.join(self.root, "dists", "stable"),
            capture_output=True,
            check=True,
        ).stdout
        with open(os.path.join(self.root, "dists", "stable", "Release"), "wb") as f:
            f.write(release)

    def _apt(self, source: str) -> float:
        base = _fresh(self.tmp, "apt")
        empty = os.path.join(base, "empty")
        for d in ("empty", "lists/partial", "cache/archives/partial", "cwd"):
            os.makedirs(os.path.join(base, d))
        open(os.path.join(base, "status"), "w").close()
        with open(os.path.join(base, "sources.list"), "w") as f:
            f.write(f"deb [trusted=yes] {source} stable main\n")
        settings = {
            "Dir::Etc::Parts": empty,
            "Dir::Etc::Main": "/dev/null",
            "Dir::Etc::SourceList": os.path.join(base, "sources.list"),
            "Dir::Etc::SourceParts": empty,
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": empty,
            "Dir::Etc::TrustedParts": empty,
            "Dir::State": base,
            "Dir::State::status": os.path.join(base, "status"),
            "Dir::State::Lists": os.path.join(base, "lists"),
            "Dir::Cache": os.path.join(base, "cache"),
            "Dir::Log": base,
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "APT::Architecture": self.arch,
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Acquire::Retries": "0",
            "Acquire::http::Proxy": "DIRECT",
            "Debug::NoLocking": "1",
        }
        config = os.path.join(base, "apt.conf")
        with open(config, "w") as f:
            f.write("".join(f'{k} "{v}";\n' for k, v in settings.items()))
        env = _env(APT_CONFIG=config, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        cwd = os.path.join(base, "cwd")
        try:
            took = _timed(["apt-get", "-q", "update"], env, cwd=cwd)
            took += _timed(["apt-get", "-q", "download", *self.packages], env, cwd=cwd)
            return took
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def client(self, cache: str) -> float:
        return self._apt(f"{cache}/debian/")

    def floor(self) -> float:
        return self._apt(f"file:{self.root}")


ECOSYSTEMS: dict[str, type[Ecosystem]] = {
    "pip": Pip,
    "go": Go,
    "cargo": Cargo,
    "gem": Gem,
    "apt": Apt,
}


def _spawn(
    procs: list[subprocess.Popen[bytes]], argv: list[str], log: str, port: int
) -> subprocess.Popen[bytes]:
    env = _env(PYTHONPATH=REPO)  # this checkout's twistd dropin
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    procs.append(proc)
    wait_listening(proc, port, log)
    return proc


def measure(
    eco: Ecosystem, stop: Callable[[subprocess.Popen[bytes]], None]
) -> dict[str, float]:
    """cold, warm and floor seconds for ``eco``."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        oport, pport = free_port(), free_port()
        origin = f"http://127.0.0.1:{oport}/"
        eco.build(origin)
        log = os.path.join(eco.tmp, f"{eco.name}.log")
        server = _spawn(
            procs,
            [
                sys.executable,
                "-m",
                "twisted",
                "web",
                "--listen",
                f"tcp:{oport}:interface=127.0.0.1",
                "--path",
                eco.root,
            ],
            log,
            oport,
        )
        mirrors: list[str] = []
        for value in eco.mirrors:
            mirrors += ["--mirror", value.format(origin=origin)]
        _spawn(
            procs,
            [
                sys.executable,
                "-c",
                TWISTD,
                "-n",
                "--pidfile=",
                "--logfile",
                log,
                "cachingproxy",
                "--listen",
                f"tcp:{pport}:interface=127.0.0.1",
                "--cache-dir",
                _fresh(eco.tmp, "cache"),
                "--allow-upstream",
                "127.0.0.1",
                "--allow-client",
                "127.0.0.1",
                "--workers",
                "1",
                *mirrors,
            ],
            log,
            pport,
        )
        cache = f"http://127.0.0.1:{pport}"
        result = {"cold": eco.client(cache)}
        stop(server)
        result["warm"] = eco.client(cache)
        result["floor"] = eco.floor()
        return result
    finally:
        for proc in procs:
            stop(proc)


def run_all(
    names: list[str],
    count: int,
    size: int,
    stop: Callable[[subprocess.Popen[bytes]], None],
) -> None:
    tmp = tempfile.mkdtemp(prefix="cachingproxy-bench-eco-")
    try:
        rows: list[tuple[str, dict[str, float] | str]] = []
        for name in names:
            cls = ECOSYSTEMS[name]
            if shutil.which(cls.tool) is None:
                rows.append((name, f"skipped: {cls.tool} not installed"))
                continue
            eco = cls(tmp, count, size)
            print(
                f"{name}: building {count} packages of {size // 1024} KiB ...",
                flush=True,
            )
            rows.append((name, measure(eco, stop)))
            print(f"{name}: {rows[-1][1]}", flush=True)
        report(rows, count, size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows: list[tuple[str, Any]], count: int, size: int) -> None:
    print()
    print(
        f"{count} packages of {size // 1024} KiB per ecosystem, one run each; seconds and x floor"
    )
    print(
        f"{'client':<8} {'floor':>7} {'cold':>7} {'warm':>7} {'cold/floor':>11} {'warm/floor':>11} {'cold/warm':>10}"
    )
    for name, r in rows:
        if isinstance(r, str):
            print(f"{name:<8} {r}")
            continue
        print(
            f"{name:<8} {r['floor']:>6.2f}s {r['cold']:>6.2f}s {r['warm']:>6.2f}s "
            f"{r['cold'] / r['floor']:>10.2f}x {r['warm'] / r['floor']:>10.2f}x {r['cold'] / r['warm']:>9.2f}x"
        )
