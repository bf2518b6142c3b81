"""The fleet's options (SPEC 1, 12): checked values, one clear error each."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from cachingproxy.options import ConfigError, make_config


class FleetOptionTests(TestCase):
    def _config(self, **given: object) -> object:
        cache = self.mktemp()
        return make_config({"cache-dir": cache, **given}, environ={}, hostname="h")

    def _secret(self, text: str = "s" * 20) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_good(self) -> None:
        config = self._config(
            **{
                "shared-store": "s3://bkt/some/prefix",
                "s3-endpoint": "http://127.0.0.1:8333/",
                "advertise": "http://node-1:3128",
                "fleet-secret": self._secret(),
            }
        )
        self.assertEqual(config.shared_store, "s3://bkt/some/prefix/")  # type: ignore[attr-defined]
        self.assertEqual(config.s3_endpoint, "http://127.0.0.1:8333")  # type: ignore[attr-defined]
        self.assertEqual(config.advertise, "http://node-1:3128")  # type: ignore[attr-defined]
        from cachingproxy.fleet.settings import with_advertised_name

        # requests to the advertised name are for the proxy itself
        named = with_advertised_name(config)  # type: ignore[arg-type]
        self.assertEqual(named.names, ("h", "localhost", "node-1"))

    def test_defaults(self) -> None:
        config = self._config()
        self.assertIsNone(config.shared_store)  # type: ignore[attr-defined]
        self.assertIsNone(config.advertise)  # type: ignore[attr-defined]

    def test_bad_values_name_the_option(self) -> None:
        cases = [
            ({"shared-store": "http://bkt/x"}, "--shared-store: "),
            ({"shared-store": "s3://Bad_Bucket"}, "--shared-store: "),
            (
                {"shared-store": "s3://bkt", "s3-endpoint": "ftp://x"},
                "--s3-endpoint: ",
            ),
            (
                {
                    "shared-store": "s3://bkt",
                    "advertise": "http://h:3128",
                    "fleet-secret": self._secret("short"),
                },
                "--fleet-secret: ",
            ),
            (
                {"shared-store": "s3://bkt", "advertise": "http://h:3128"},
                "--advertise: needs --fleet-secret",
            ),
            (
                {"advertise": "http://h:1", "fleet-secret": self._secret()},
                "--advertise: needs --shared-store",
            ),
            ({"s3-endpoint": "http://h:1"}, "--s3-endpoint: needs --shared-store"),
        ]
        for given, start in cases:
            with self.assertRaises(ConfigError) as caught:
                self._config(**given)
            self.assertTrue(
                str(caught.exception).startswith(start), str(caught.exception)
            )
            self.assertNotIn("\n", str(caught.exception))


class HealthTests(TestCase):
    """Degraded, not down: the state shown in /status.json, logged once a
    minute (SPEC 12)."""

    def test_logged_once_a_minute(self) -> None:
        from twisted.internet.task import Clock
        from twisted.logger import globalLogPublisher

        from cachingproxy.fleet.health import Health

        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        health = Health(clock, "s3://bkt/p/")
        self.assertEqual(health.snapshot()["ok"], True)
        health.failed(OSError("connection refused"))
        clock.advance(30)
        health.failed(OSError("connection refused"))
        warnings = [e for e in events if "unreachable" in str(e.get("log_format"))]
        self.assertEqual(len(warnings), 1)
        snapshot = health.snapshot()
        self.assertEqual(
            (snapshot["ok"], snapshot["error"], snapshot["failures"]),
            (False, "connection refused", 2),
        )
        clock.advance(31)
        health.failed(OSError("connection refused"))
        warnings = [e for e in events if "unreachable" in str(e.get("log_format"))]
        self.assertEqual(len(warnings), 2)
        health.succeeded()
        self.assertEqual((health.ok, health.snapshot()["error"]), (True, None))
