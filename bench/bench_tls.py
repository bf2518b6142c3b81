#!/usr/bin/env python3
"""Benchmark: what TLS interception costs on the hit path.

Run from a checkout, with a Python that has the project's dependencies::

    python bench/bench_tls.py            # 256 MiB file, 6 s load runs
    python bench/bench_tls.py --quick    # 16 MiB file, 2 s load runs

Everything runs on 127.0.0.1; nothing else is contacted.  It makes a
throw-away "public" CA and a certificate for ``localhost`` from it, then
starts two child processes:

* an origin: twisted.web's static ``File`` over a temporary directory in its
  own process, on two ports at once -- plain HTTP on 127.0.0.1 and HTTPS
  with that certificate -- counting the requests it gets per path
  (``GET /_count`` on the HTTP port answers them as JSON);
* the proxy: a real ``twistd -n cachingproxy --intercept localhost
  --upstream-ca PUBLIC_CA --connect-ports HTTPS_PORT``, which generates its
  own CA (``ca.pem``) in a temporary cache directory.

Each file is fetched once both ways to fill the cache (MISS), and then every
figure is a HIT, measured for the intercepted ``https://localhost:PORT/…``
(CONNECT, TLS to the proxy with a leaf certificate from its CA, the clients
trusting only ``ca.pem``) next to the plain ``http://127.0.0.1:PORT/…`` of
the same bytes through the same proxy (absolute-form, ``http_proxy``
style), in the same run; the ratio is HTTPS / HTTP, the TLS cost:

1. MB/s for one ``curl`` reading the 256 MiB HIT; median of 3 runs;
2. requests/s for a 10 KiB HIT with ``curl`` processes that each fetch the
   URL many times over one keep-alive connection (for HTTPS: one CONNECT
   tunnel and one TLS session per process; ``%{num_connects}`` proves it);
3. the same with Python ``http.client`` in threads (``set_tunnel`` for
   HTTPS), keep-alive; the GIL makes the client the bottleneck here;
4. TLS handshakes/s with the leaf certificate already cached: threads that
   each loop over connect, ``CONNECT localhost:PORT``, a full TLS handshake
   (no session resumption), close; next to the same sessions without the
   handshake (connect, CONNECT, 200, close), and, in the note, full
   handshakes straight to the origin (Twisted and pyOpenSSL as well).

The origin's request counts confirm afterwards that no measured request
reached it.  MB is 10^6 bytes; KiB and MiB are powers of 1024.  Everything
is written under one temporary directory that is deleted at the end; every
child is killed on exit; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # bench/bench.py: process helpers, make_file, human, print_table

KiB, MiB = bench.KiB, bench.MiB
HOST = "localhost"


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    throughput_runs: int
    load_seconds: float
    curl_clients: int
    curl_requests: int
    """Requests per curl process (one keep-alive connection each)."""
    threads: int
    handshake_seconds: float


DEFAULT = Sizes(10 * KiB, 256 * MiB, 3, 6.0, 8, 3000, 8, 5.0)
QUICK = Sizes(10 * KiB, 16 * MiB, 3, 2.0, 8, 500, 8, 2.0)


# -- certificates ----------------------------------------------------------------


def make_certificates(work: str) -> tuple[str, str]:
    """A "public" CA and a server certificate for localhost and 127.0.0.1
    from it; returns the CA's PEM file and the server's cert+key PEM file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench public CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        x509.DNSName(HOST),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = os.path.join(work, "public-ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    server_file = os.path.join(work, "origin.pem")
    with open(server_file, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ca_file, server_file


# -- the origin (runs in its own process) ----------------------------------------


def serve_origin(root: str, http_port: int, https_port: int, pem: str) -> None:
    """Static files from ``root``: plain HTTP on ``http_port``, HTTPS with
    the certificate and key in ``pem`` on ``https_port`` (both 127.0.0.1);
    ``GET /_count`` answers the request counts per scheme and path."""
    from twisted.internet import reactor, ssl
    from twisted.web import resource, server, static

    counts: collections.Counter[str] = collections.Counter()

    class Count(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            return json.dumps(counts).encode()

    class Root(resource.Resource):
        def __init__(self, scheme: str) -> None:
            super().__init__()
            self.scheme = scheme
            self.files = static.File(root)

        def getChildWithDefault(  # noqa: N802
            self, name: bytes, request: server.Request
        ) -> resource.Resource:
            if name == b"_count":
                return Count()
            counts[self.scheme + request.path.decode("latin-1")] += 1
            return self.files.getChildWithDefault(name, request)

    class QuietSite(server.Site):
        def log(self, request: Any) -> None:
            pass

    with open(pem, "rb") as f:
        options = ssl.PrivateCertificate.loadPEM(f.read()).options()
    plain: Any = QuietSite(Root("http:"))
    tls: Any = QuietSite(Root("https:"))
    reactor.listenTCP(http_port, plain, interface="127.0.0.1")
    reactor.listenSSL(https_port, tls, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()


# -- clients -----------------------------------------------------------------------


@dataclass
class Setup:
    """The ports and files of one run."""

    proxy_port: int
    http_port: int
    https_port: int
    proxy_ca: str
    public_ca: str

    def https_url(self, path: str) -> str:
        return f"https://{HOST}:{self.https_port}{path}"

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def url(self, tls: bool, path: str) -> str:
        return self.https_url(path) if tls else self.http_url(path)

    def proxy_argv(self, tls: bool) -> list[str]:
        """curl options that go through the proxy (and trust its CA)."""
        argv = ["--noproxy", "", "--proxy", f"http://127.0.0.1:{self.proxy_port}"]
        return [*argv, "--cacert", self.proxy_ca] if tls else argv

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only the proxy's CA."""
        return ssl.create_default_context(cafile=self.proxy_ca)


def fetch_once(setup: Setup, tls: bool, path: str) -> tuple[int, str, int]:
    """Status, X-Cache and body length of one request through the proxy."""
    argv = ["curl", "-s", "-S", "-o", "/dev/null", "-D", "-", "--max-time", "300"]
    argv += ["-w", "\n%{http_code} %{size_download}\n", *setup.proxy_argv(tls)]
    result = subprocess.run(
        [*argv, setup.url(tls, path)], capture_output=True, text=True, timeout=320
    )
    if result.returncode != 0:
        raise SystemExit(f"curl {setup.url(tls, path)}: {result.stderr.strip()}")
    cache = "-"
    for line in result.stdout.splitlines():
        if line.lower().startswith("x-cache:"):
            cache = line.split(":", 1)[1].strip()
    code, size = result.stdout.strip().splitlines()[-1].split()
    return int(code), cache, int(float(size))


def throughput(setup: Setup, tls: bool, path: str, size: int) -> float:
    """MB/s of one curl reading ``path`` through the proxy."""
    argv = ["curl", "-s", "-S", "-o", "/dev/null", "--max-time", "600"]
    argv += ["-w", "%{speed_download} %{size_download} %{http_code}"]
    result = subprocess.run(
        [*argv, *setup.proxy_argv(tls), setup.url(tls, path)],
        capture_output=True,
        text=True,
        timeout=620,
    )
    speed, got, code = result.stdout.split()
    if code != "200" or int(float(got)) != size:
        raise SystemExit(f"curl: status {code}, {got} of {size} bytes")
    return float(speed) / 1e6


def load_curl(
    setup: Setup, tls: bool, path: str, size: int, clients: int, requests: int
) -> tuple[float, str]:
    """Requests/s of ``clients`` curl processes each fetching ``path``
    ``requests`` times over one keep-alive connection."""
    config = os.path.join(os.path.dirname(setup.proxy_ca), f"curl-{tls}.conf")
    with open(config, "w", encoding="ascii") as f:
        for _ in range(requests):
            f.write(f'url = "{setup.url(tls, path)}"\noutput = "/dev/null"\n')
    argv = ["curl", "-s", "-S", "--max-time", "300", "-K", config]
    argv += ["-w", "%{http_code} %{size_download} %{num_connects}\n"]
    argv += setup.proxy_argv(tls)
    started = time.monotonic()
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(clients)
    ]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=320)
            if proc.returncode != 0:
                raise SystemExit(f"curl -K: {stderr.decode(errors='replace')}")
            outputs.append(stdout.decode())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - started
    ok = connects = 0
    for out in outputs:
        for line in out.splitlines():
            code, got, new = line.split()
            ok += code == "200" and int(float(got)) == size
            connects += int(new)
    if ok != clients * requests:
        raise SystemExit(f"curl load: {ok} of {clients * requests} requests whole")
    how = f"{clients} curl x {requests} requests, {connects} connections"
    return ok / elapsed, how


def load_python(
    setup: Setup, tls: bool, path: str, size: int, threads: int, seconds: float
) -> tuple[float, str]:
    """Requests/s of ``threads`` keep-alive http.client connections."""
    counts, errors, connections = [0] * threads, [0] * threads, [0] * threads
    context = setup.client_context()
    deadline = time.monotonic() + seconds

    def connect() -> http.client.HTTPConnection:
        if not tls:
            return http.client.HTTPConnection("127.0.0.1", setup.proxy_port, timeout=10)
        conn = http.client.HTTPSConnection(
            "127.0.0.1", setup.proxy_port, timeout=10, context=context
        )
        conn.set_tunnel(HOST, setup.https_port)
        return conn

    def worker(i: int) -> None:
        target = path if tls else setup.http_url(path)
        conn = connect()
        connections[i] += 1
        while time.monotonic() < deadline:
            try:
                conn.request("GET", target)
                response = conn.getresponse()
                body = response.read()
                if response.status == 200 and len(body) == size:
                    counts[i] += 1
                else:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = connect()
                connections[i] += 1
        conn.close()

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    elapsed = time.monotonic() - started
    if sum(errors):
        print(f"    python load (tls={tls}): {sum(errors)} failed requests")
    how = f"{threads} threads, {sum(connections)} connections, {seconds:g} s"
    return sum(counts) / elapsed, how


def connect_tunnel(setup: Setup) -> socket.socket:
    """A socket to the proxy on which ``CONNECT localhost:PORT`` got 200."""
    sock = socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10)
    authority = f"{HOST}:{setup.https_port}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 4096:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    if not head.startswith(b"HTTP/1.1 200 ") or not head.endswith(b"\r\n\r\n"):
        sock.close()
        raise OSError(f"CONNECT answered {head[:100]!r}")
    return sock


def sessions(
    threads: int, seconds: float, one: Callable[[], str]
) -> tuple[float, int, collections.Counter[str]]:
    """Sessions/s of ``threads`` threads each calling ``one`` in a loop for
    ``seconds``; the number of failures and what ``one`` returned."""
    counts, errors = [0] * threads, [0] * threads
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                what = one()
            except (OSError, ssl.SSLError):
                errors[i] += 1
                continue
            counts[i] += 1
            with lock:
                seen[what] += 1

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    return sum(counts) / (time.monotonic() - started), sum(errors), seen


def intercepted_handshake(setup: Setup, context: ssl.SSLContext) -> str:
    """CONNECT, a full TLS handshake with the proxy, close; the TLS version."""
    sock = connect_tunnel(setup)
    try:
        with context.wrap_socket(sock, server_hostname=HOST) as tls:
            return f"{tls.version()} {tls.cipher()[0]}"  # type: ignore[index]
    finally:
        sock.close()


def connect_only(setup: Setup) -> str:
    """CONNECT, 200, close (no handshake)."""
    connect_tunnel(setup).close()
    return "CONNECT only"


def direct_handshake(setup: Setup, context: ssl.SSLContext) -> str:
    """A full TLS handshake straight with the origin, close."""
    sock = socket.create_connection(("127.0.0.1", setup.https_port), timeout=10)
    try:
        with context.wrap_socket(sock, server_hostname=HOST) as tls:
            return f"{tls.version()} {tls.cipher()[0]}"  # type: ignore[index]
    finally:
        sock.close()


def origin_counts(setup: Setup) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", setup.http_port, timeout=10)
    try:
        conn.request("GET", "/_count")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


# -- the benchmark -----------------------------------------------------------------


def run(sizes: Sizes, work: str) -> list[bench.Row]:
    rows: list[bench.Row] = []
    root = os.path.join(work, "origin")
    os.makedirs(root)
    print(f"== writing test files under {work}")
    bench.make_file(os.path.join(root, "small.whl"), sizes.small)
    bench.make_file(os.path.join(root, "large.whl"), sizes.large)
    public_ca, origin_pem = make_certificates(work)
    cache_dir = os.path.join(work, "cache")

    with bench.children() as procs:
        http_port, https_port, pport = (bench.free_port() for _ in range(3))
        origin_log = os.path.join(work, "origin.log")
        origin_args = ["--serve-origin", root, str(http_port), str(https_port)]
        with open(origin_log, "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        *origin_args,
                        origin_pem,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            )
        bench.wait_listening(procs[-1], http_port, origin_log)
        bench.wait_listening(procs[-1], https_port, origin_log)
        proxy_log = os.path.join(work, "proxy.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [bench.REPO, env.get("PYTHONPATH")])
        )
        argv = [sys.executable, "-c", bench.TWISTD, "-n", "--pidfile="]
        argv += ["--logfile", proxy_log, "cachingproxy"]
        argv += ["--listen", f"tcp:{pport}:interface=127.0.0.1"]
        argv += ["--cache-dir", cache_dir]
        argv += ["--allow-upstream", "127.0.0.0/8", "--allow-client", "127.0.0.1"]
        argv += ["--intercept", HOST, "--upstream-ca", public_ca]
        argv += ["--connect-ports", str(https_port)]
        procs.append(
            subprocess.Popen(
                argv,
                env=env,
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        proxy_proc = procs[-1]
        bench.wait_listening(proxy_proc, pport, proxy_log)
        setup = Setup(
            pport, http_port, https_port, os.path.join(cache_dir, "ca.pem"), public_ca
        )

        def check(got: tuple[int, str, int], size: int, want: str, what: str) -> None:
            if got != (200, want, size):
                raise SystemExit(
                    f"{what}: expected 200 {want} {size} bytes, got {got}"
                    f"\n{bench.tail(proxy_log)}"
                )

        def fill(path: str, size: int) -> None:
            """MISS, then wait until the entry is a HIT, both ways."""
            for tls in (True, False):
                what = setup.url(tls, path)
                check(fetch_once(setup, tls, path), size, "MISS", what)
                deadline = time.monotonic() + 120
                while fetch_once(setup, tls, path)[1] != "HIT":
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{what} never became a HIT")
                    time.sleep(0.2)

        print("== filling the cache (one MISS per file and scheme)")
        fill("/small.whl", sizes.small)
        fill("/large.whl", sizes.large)
        before = origin_counts(setup)

        # 1. large HIT throughput
        print(f"== {bench.human(sizes.large)} HIT throughput")
        mbs = {
            tls: statistics.median(
                throughput(setup, tls, "/large.whl", sizes.large)
                for _ in range(sizes.throughput_runs)
            )
            for tls in (True, False)
        }
        rows.append(
            (
                f"{bench.human(sizes.large)} HIT MB/s",
                f"{mbs[True]:,.0f}",
                f"{mbs[False]:,.0f}",
                f"{mbs[True] / mbs[False]:.2f}",
                f"one curl client, median of {sizes.throughput_runs} runs",
            )
        )

        # 2. small HIT requests/s, curl
        small = bench.human(sizes.small)
        print(f"== {small} HIT requests/s (curl, keep-alive)")
        rate, hows = {}, {}
        for tls in (True, False):
            rate[tls], hows[tls] = load_curl(
                setup,
                tls,
                "/small.whl",
                sizes.small,
                sizes.curl_clients,
                sizes.curl_requests,
            )
        rows.append(
            (
                f"{small} HIT requests/s, curl",
                f"{rate[True]:,.0f}",
                f"{rate[False]:,.0f}",
                f"{rate[True] / rate[False]:.2f}",
                f"HTTPS: {hows[True]}; HTTP: {hows[False]}",
            )
        )

        # 3. small HIT requests/s, Python
        print(f"== {small} HIT requests/s (python http.client, keep-alive)")
        for tls in (True, False):
            rate[tls], hows[tls] = load_python(
                setup, tls, "/small.whl", sizes.small, sizes.threads, sizes.load_seconds
            )
        rows.append(
            (
                f"{small} HIT requests/s, python",
                f"{rate[True]:,.0f}",
                f"{rate[False]:,.0f}",
                f"{rate[True] / rate[False]:.2f}",
                f"http.client, HTTPS via set_tunnel; {hows[True]}",
            )
        )

        # 4. handshakes/s with a cached leaf certificate
        print("== TLS handshakes/s (cached leaf certificate)")
        context = setup.client_context()
        intercepted_handshake(setup, context)  # the leaf is minted and cached
        threads, seconds = 4, sizes.handshake_seconds
        shakes, failed, versions = sessions(
            threads, seconds, lambda: intercepted_handshake(setup, context)
        )
        plain, plain_failed, _ = sessions(threads, seconds, lambda: connect_only(setup))
        public = ssl.create_default_context(cafile=setup.public_ca)
        direct, direct_failed, _ = sessions(
            threads, seconds, lambda: direct_handshake(setup, public)
        )
        rows.append(
            (
                "TLS handshakes/s, CONNECT + handshake",
                f"{shakes:,.0f}",
                f"{plain:,.0f}",
                f"{shakes / plain:.2f}",
                f"HTTP column: CONNECT + 200 + close, no TLS; {threads} Python"
                f" threads, {seconds:g} s each, a new connection and full handshake"
                f" each time ({', '.join(versions)}); failures {failed}/"
                f"{plain_failed}; straight to the origin (twisted, no proxy):"
                f" {direct:,.0f}/s ({direct_failed} failures)",
            )
        )

        after = origin_counts(setup)
        fetched = {k: v - before.get(k, 0) for k, v in after.items()}
        https = sum(v for k, v in fetched.items() if k.startswith("https:"))
        plain_http = sum(v for k, v in fetched.items() if k.startswith("http:"))
        rows.append(
            (
                "origin requests during the measurements",
                str(https),
                str(plain_http),
                "PASS" if https == plain_http == 0 else "FAIL",
                "every measured request must be a HIT: PASS = 0 and 0",
            )
        )
        if proxy_proc.poll() is not None:
            raise SystemExit(f"the proxy died:\n{bench.tail(proxy_log)}")
    return rows


def print_table(rows: list[bench.Row], title: str) -> None:
    header = ("measure", "HTTPS intercepted", "plain HTTP", "HTTPS/HTTP")
    bench.print_table(rows, title, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument("--serve-origin", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_origin:
        root, http_port, https_port, pem = args.serve_origin
        serve_origin(root, int(http_port), int(https_port), pem)
        return
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed (apt-get install -y curl)")
    sizes = QUICK if args.quick else DEFAULT
    work = tempfile.mkdtemp(prefix="cachingproxy-bench-tls-")
    started = time.monotonic()
    try:
        rows = run(sizes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import OpenSSL

    import twisted

    title = (
        f"cachingproxy TLS interception benchmark"
        f" ({'--quick' if args.quick else 'default sizes'}; {os.cpu_count()} CPUs;"
        f" Python {sys.version.split()[0]}; Twisted {twisted.__version__};"
        f" pyOpenSSL {OpenSSL.__version__}; {ssl.OPENSSL_VERSION};"
        f" {time.monotonic() - started:.0f} s)"
    )
    print_table(rows, title)
    if any(row[3] == "FAIL" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
