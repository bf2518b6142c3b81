"""Statistics, Prometheus metrics and the status page (SPEC 9, issue 3)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import attrs
from OpenSSL import SSL
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived

from cachingproxy import __version__
from cachingproxy.errors import DestinationRefused, UpstreamTimeout
from cachingproxy.fetch.upstream import DNSLookupFailed
from cachingproxy.ops.metrics import CONTENT_TYPE, Figures, Metrics, metrics_text
from cachingproxy.ops.stats import MAX_KEYS, Stats, upstream_error_kind
from cachingproxy.ops.statuspage import (
    format_bytes,
    format_duration,
    render_html,
    render_json,
)

SVG = "{http://www.w3.org/2000/svg}"


@attrs.frozen
class Usage:
    """Has the attributes of cachingproxy.cache.entry.Usage that Stats reads."""

    bytes: int
    entries: int
    max_size: int | None


@attrs.define
class FakeDownload:
    """Has the attributes of cachingproxy.fetch.download.Download that Stats reads."""

    url: str
    bytes_written: int
    total: int | None
    clients: int
    started_at: float


class Fixture:
    """A Stats over a Clock, with a settable usage and downloads in flight."""

    def __init__(self, start: float = 1_000_000.0, **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(start)
        self.usage = Usage(bytes=0, entries=0, max_size=1000)
        self.downloads: list[FakeDownload] = []
        self.stats = Stats(
            self.clock,
            usage=lambda: self.usage,
            in_flight=lambda: self.downloads,
            **kwargs,
        )

    def request(
        self,
        cache: str,
        *,
        status: int = 200,
        size: int = 0,
        duration: float = 0.01,
        host: str = "files.example",
        url: str = "http://files.example/a.whl",
    ) -> None:
        self.stats.record_request(
            cache=cache,
            status=status,
            bytes_sent=size,
            duration=duration,
            host=host,
            url=url,
        )


def script(f: Fixture) -> None:
    """A fixed mix of 14 requests: 3 MISS, 5 HIT, 1 REVALIDATED, 1 STALE,
    2 BYPASS, one refused (``-``) and one MISS that upstream failed (502)."""
    for _ in range(3):
        f.request("MISS", size=1000)
    for _ in range(5):
        f.request("HIT", size=1000)
    f.request("REVALIDATED", size=500)
    f.request("STALE", size=500)
    f.request("BYPASS", size=200, url="http://api.example/x", host="api.example")
    f.request("BYPASS", size=200, url="http://api.example/x", host="api.example")
    f.request("-", status=403, size=20, url="", host="-")
    f.request("MISS", status=502, size=30)
    f.stats.record_upstream_bytes(3000)
    f.stats.record_upstream_bytes(400)


class StatsCountersTests(SynchronousTestCase):
    def test_counts_by_cache_status(self) -> None:
        """Every X-Cache value is counted under its own /status.json key and
        ``requests`` is their sum; a refusal (``-``) and a 5xx are errors."""
        f = Fixture()
        script(f)
        s = f.stats.snapshot()
        self.assertEqual(s["requests"], 14)
        self.assertEqual(s["hits"], 5)
        self.assertEqual(s["misses"], 4)
        self.assertEqual(s["revalidated"], 1)
        self.assertEqual(s["stale"], 1)
        self.assertEqual(s["bypass"], 2)
        self.assertEqual(s["offline"], 0)
        self.assertEqual(s["errors"], 2)
        self.assertEqual(s["from_cache"], 7)

    def test_ratios_and_bytes(self) -> None:
        """The hit ratio is requests served from cache over those plus
        misses (BYPASS and refusals left out); the byte hit ratio is bytes
        sent from cache over all bytes sent; upstream bytes are what was
        recorded as received."""
        f = Fixture()
        script(f)
        s = f.stats.snapshot()
        self.assertAlmostEqual(s["hit_ratio"], 7 / 11)
        self.assertEqual(s["bytes_from_cache"], 5000 + 500 + 500)
        self.assertEqual(s["bytes_served"], 3000 + 6000 + 400 + 20 + 30)
        self.assertAlmostEqual(s["byte_hit_ratio"], 6000 / 9450)
        self.assertEqual(s["bytes_from_upstream"], 3400)

    def test_ratios_without_traffic(self) -> None:
        """With nothing counted yet the ratios are 0, not a division error."""
        s = Fixture().stats.snapshot()
        self.assertEqual((s["hit_ratio"], s["byte_hit_ratio"]), (0.0, 0.0))
        self.assertEqual(s["requests"], 0)

    def test_offline_miss_is_not_a_hit(self) -> None:
        """An OFFLINE entry served counts as from the cache; an OFFLINE 504
        (not cached and --offline) counts as offline, as an error and as a
        miss in the hit ratio."""
        f = Fixture()
        f.request("OFFLINE", size=100)
        f.request("OFFLINE", status=504, size=10)
        s = f.stats.snapshot()
        self.assertEqual(s["offline"], 2)
        self.assertEqual(s["from_cache"], 1)
        self.assertEqual(s["errors"], 1)
        self.assertAlmostEqual(s["hit_ratio"], 0.5)
        self.assertEqual(s["bytes_from_cache"], 100)

    def test_unknown_cache_status_is_an_error(self) -> None:
        """A cache value that is not an X-Cache status is counted as ``-``
        rather than creating a new key (the label set stays bounded)."""
        f = Fixture()
        f.request("WEIRD", status=500)
        self.assertEqual(f.stats.by_cache["-"], 1)
        self.assertNotIn("WEIRD", f.stats.by_cache)
        self.assertEqual(f.stats.snapshot()["errors"], 1)

    def test_usage_is_read_live(self) -> None:
        """Disk bytes, budget and entries come from the usage callable at
        snapshot time."""
        f = Fixture()
        self.assertEqual(f.stats.snapshot()["disk_bytes"], 0)
        f.usage = Usage(bytes=700, entries=3, max_size=2000)
        s = f.stats.snapshot()
        self.assertEqual((s["disk_bytes"], s["entries"], s["max_size"]), (700, 3, 2000))

    def test_uptime_and_version(self) -> None:
        """Uptime counts from the Stats' creation on the injected clock."""
        f = Fixture()
        f.clock.advance(125)
        s = f.stats.snapshot()
        self.assertEqual(s["uptime"], 125)
        self.assertEqual(s["version"], __version__)

    def test_upstream_errors_by_kind(self) -> None:
        """Upstream errors are counted by kind; an unknown kind is ``other``
        and every kind is present even at zero."""
        f = Fixture()
        f.stats.record_upstream_error("timeout")
        f.stats.record_upstream_error("timeout")
        f.stats.record_upstream_error("tls")
        f.stats.record_upstream_error("cosmic-ray")
        errors = f.stats.snapshot()["upstream_errors"]
        self.assertEqual(errors["timeout"], 2)
        self.assertEqual(errors["tls"], 1)
        self.assertEqual(errors["other"], 1)
        self.assertEqual(errors["dns"], 0)
        self.assertNotIn("cosmic-ray", errors)

    def test_snapshot_is_json(self) -> None:
        """The snapshot (with a download in flight) is what /status.json
        serves: render_json round-trips it."""
        f = Fixture()
        script(f)
        f.downloads.append(FakeDownload("http://x/a", 10, None, 1, f.clock.seconds()))
        s = f.stats.snapshot()
        self.assertEqual(json.loads(render_json(s)), s)


class InFlightTests(SynchronousTestCase):
    def test_rate_from_started_at(self) -> None:
        """Each download in flight shows URL, bytes so far, total, clients
        and rate = bytes / seconds since it started, on the injected clock."""
        f = Fixture()
        f.downloads.append(
            FakeDownload(
                "http://files.example/big.iso", 0, 10_000, 2, f.clock.seconds()
            )
        )
        f.clock.advance(4)
        f.downloads[0].bytes_written = 4000
        [d] = f.stats.snapshot()["in_flight"]
        self.assertEqual(d["url"], "http://files.example/big.iso")
        self.assertEqual(d["bytes"], 4000)
        self.assertEqual(d["total"], 10_000)
        self.assertEqual(d["clients"], 2)
        self.assertAlmostEqual(d["rate"], 1000.0)

    def test_rate_at_start_is_zero(self) -> None:
        """A download that started this instant has rate 0, not a division
        error; an unknown total stays None."""
        f = Fixture()
        f.downloads.append(FakeDownload("http://x/a", 0, None, 0, f.clock.seconds()))
        [d] = f.stats.snapshot()["in_flight"]
        self.assertEqual(d["rate"], 0.0)
        self.assertIsNone(d["total"])

    def test_real_download_fits(self) -> None:
        """The real Downloads.in_flight values can be handed to Stats."""
        from cachingproxy.fetch.sharing import Downloads

        downloads = Downloads()
        stats = Stats(
            Clock(),
            usage=lambda: Usage(0, 0, 1),
            in_flight=lambda: downloads.in_flight.values(),
        )
        self.assertEqual(stats.snapshot()["in_flight"], [])


class HistoryTests(SynchronousTestCase):
    def test_sixty_minute_buckets(self) -> None:
        """history has one bucket per minute for the last hour, oldest first,
        the current minute last, with requests and hits of that minute."""
        f = Fixture(start=6000.0)  # minute 100 starts here
        f.request("HIT")
        f.request("MISS")
        f.clock.advance(60)
        f.request("HIT")
        history = f.stats.snapshot()["history"]
        self.assertEqual(len(history), 60)
        self.assertEqual(history[-1]["time"], 6060)
        self.assertEqual(history[0]["time"], 6060 - 59 * 60)
        self.assertEqual(
            [(b["requests"], b["hits"], b["misses"]) for b in history[-2:]],
            [(2, 1, 1), (1, 1, 0)],
        )
        self.assertEqual(sum(b["requests"] for b in history), 3)

    def test_buckets_roll_over_and_drop_after_an_hour(self) -> None:
        """A minute's bucket moves back as time passes and is gone once it
        is more than an hour old."""
        f = Fixture(start=6000.0)
        f.request("HIT")
        f.clock.advance(59 * 60)
        history = f.stats.snapshot()["history"]
        self.assertEqual((history[0]["time"], history[0]["requests"]), (6000, 1))
        f.clock.advance(60)
        history = f.stats.snapshot()["history"]
        self.assertEqual(sum(b["requests"] for b in history), 0)
        self.assertEqual(history[0]["time"], 6060)

    def test_history_memory_is_bounded(self) -> None:
        """After hours of traffic at most an hour of buckets is kept."""
        f = Fixture()
        for _ in range(150):
            f.request("HIT")
            f.clock.advance(60)
        self.assertLessEqual(len(f.stats._history), 60)
        history = f.stats.snapshot()["history"]
        self.assertEqual(sum(b["requests"] for b in history), 59)


class TopTests(SynchronousTestCase):
    def test_top_hosts_and_objects_by_hits(self) -> None:
        """Top hosts and objects are ordered by hits; objects that were never
        served from cache are not listed."""
        f = Fixture()
        for _ in range(3):
            f.request("HIT", host="a.example", url="http://a.example/1")
        f.request("MISS", host="a.example", url="http://a.example/2")
        for _ in range(5):
            f.request("HIT", host="b.example", url="http://b.example/1")
        f.request("BYPASS", host="c.example", url="http://c.example/1")
        s = f.stats.snapshot()
        self.assertEqual(
            s["top_hosts"],
            [
                {"host": "b.example", "hits": 5, "requests": 5},
                {"host": "a.example", "hits": 3, "requests": 4},
                {"host": "c.example", "hits": 0, "requests": 1},
            ],
        )
        self.assertEqual(
            [(o["url"], o["hits"]) for o in s["top_objects"]],
            [("http://b.example/1", 5), ("http://a.example/1", 3)],
        )

    def test_counters_are_bounded(self) -> None:
        """Hosts and URLs are pruned to the busiest when more than MAX_KEYS
        (10 000) distinct ones were seen; the busy ones survive."""
        f = Fixture()
        self.assertEqual(MAX_KEYS, 10_000)
        for _ in range(5):
            f.request("HIT", host="busy.example", url="http://busy.example/x")
        for i in range(MAX_KEYS + 2000):
            f.request("MISS", host=f"h{i}.example", url=f"http://h{i}.example/")
        self.assertLessEqual(len(f.stats._hosts), MAX_KEYS)
        self.assertLessEqual(len(f.stats._objects), MAX_KEYS)
        s = f.stats.snapshot()
        self.assertEqual(s["top_hosts"][0]["host"], "busy.example")
        self.assertEqual(s["top_objects"][0]["url"], "http://busy.example/x")
        self.assertEqual(s["requests"], MAX_KEYS + 2005)

    def test_long_keys_are_truncated(self) -> None:
        """A huge URL does not take more than about a kilobyte of memory."""
        f = Fixture()
        f.request("HIT", url="http://x/" + "a" * 20_000)
        [obj] = f.stats.snapshot()["top_objects"]
        self.assertLessEqual(len(obj["url"]), 1024)
        self.assertTrue(obj["url"].startswith("http://x/aaa"))


class UpstreamErrorKindTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        """Upstream failures map onto the documented kinds, looking inside
        twisted.web's ResponseNeverReceived/ResponseFailed wrappers."""
        cases: list[tuple[Any, int, str]] = [
            (None, 503, "http_5xx"),
            (DestinationRefused("10.0.0.1"), 0, "policy"),
            (UpstreamTimeout("slow"), 0, "timeout"),
            (DNSLookupFailed("nx"), 0, "dns"),
            (ConnectionRefusedError(), 0, "refused"),
            (SSL.Error("bad cert"), 0, "tls"),
            (ResponseNeverReceived([Failure(SSL.Error("bad"))]), 0, "tls"),
            (ResponseNeverReceived([Failure(ConnectionLost())]), 0, "broken"),
            (ResponseFailed([Failure(ConnectionLost())]), 0, "broken"),
            (ResponseDone(), 0, "broken"),
            (ValueError("?"), 0, "other"),
        ]
        for failure, status, kind in cases:
            with self.subTest(failure=failure):
                self.assertEqual(upstream_error_kind(failure, status), kind)
        self.assertEqual(upstream_error_kind(Failure(UpstreamTimeout("x"))), "timeout")


def families(stats: Any) -> dict[str, Any]:
    text = metrics_text(stats).decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(family: Any, name: str, **labels: str) -> float:
    for s in family.samples:
        if s.name == name and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels} in {family.samples}")


class MetricsTests(SynchronousTestCase):
    def test_counters(self) -> None:
        """/metrics carries requests by cache status, bytes by source and
        upstream errors by kind, with the same figures as the snapshot."""
        f = Fixture()
        script(f)
        f.stats.record_upstream_error("dns")
        m = families(f.stats)
        requests = m["cachingproxy_requests"]
        self.assertEqual(requests.type, "counter")
        self.assertEqual(
            sample(requests, "cachingproxy_requests_total", cache="HIT"), 5
        )
        self.assertEqual(
            sample(requests, "cachingproxy_requests_total", cache="MISS"), 4
        )
        self.assertEqual(sample(requests, "cachingproxy_requests_total", cache="-"), 1)
        self.assertEqual(
            sample(requests, "cachingproxy_requests_total", cache="OFFLINE"), 0
        )
        b = m["cachingproxy_bytes"]
        self.assertEqual(sample(b, "cachingproxy_bytes_total", source="cache"), 6000)
        self.assertEqual(sample(b, "cachingproxy_bytes_total", source="upstream"), 3400)
        errors = m["cachingproxy_upstream_errors"]
        self.assertEqual(
            sample(errors, "cachingproxy_upstream_errors_total", kind="dns"), 1
        )
        self.assertEqual(
            sample(errors, "cachingproxy_upstream_errors_total", kind="tls"), 0
        )

    def test_gauges_are_read_at_scrape_time(self) -> None:
        """Disk bytes, budget, entries and downloads in flight are read from
        the live callables on every scrape."""
        f = Fixture()
        m = families(f.stats)
        self.assertEqual(
            sample(m["cachingproxy_disk_bytes"], "cachingproxy_disk_bytes"), 0
        )
        f.usage = Usage(bytes=4096, entries=7, max_size=1 << 30)
        f.downloads.append(FakeDownload("http://x/a", 1, None, 1, 0.0))
        f.downloads.append(FakeDownload("http://x/b", 1, None, 1, 0.0))
        m = families(f.stats)
        self.assertEqual(
            sample(m["cachingproxy_disk_bytes"], "cachingproxy_disk_bytes"), 4096
        )
        self.assertEqual(
            sample(m["cachingproxy_max_size_bytes"], "cachingproxy_max_size_bytes"),
            1 << 30,
        )
        self.assertEqual(sample(m["cachingproxy_entries"], "cachingproxy_entries"), 7)
        self.assertEqual(
            sample(
                m["cachingproxy_inflight_downloads"], "cachingproxy_inflight_downloads"
            ),
            2,
        )
        self.assertEqual(m["cachingproxy_entries"].type, "gauge")

    def test_response_histogram(self) -> None:
        """Response times go into cachingproxy_response_seconds by cache status."""
        f = Fixture()
        f.request("HIT", duration=0.002)
        f.request("HIT", duration=0.004)
        f.request("MISS", duration=3.0)
        h = families(f.stats)["cachingproxy_response_seconds"]
        self.assertEqual(h.type, "histogram")
        name = "cachingproxy_response_seconds"
        self.assertEqual(sample(h, name + "_count", cache="HIT"), 2)
        self.assertAlmostEqual(sample(h, name + "_sum", cache="HIT"), 0.006)
        self.assertEqual(sample(h, name + "_bucket", cache="HIT", le="0.0025"), 1)
        self.assertEqual(sample(h, name + "_bucket", cache="MISS", le="2.5"), 0)
        self.assertEqual(sample(h, name + "_bucket", cache="MISS", le="5.0"), 1)
        self.assertEqual(sample(h, name + "_bucket", cache="MISS", le="+Inf"), 1)
        self.assertNotIn(name + "_created", families(f.stats))

    def test_build_info(self) -> None:
        """The running version is exported as cachingproxy_build_info."""
        m = families(Fixture().stats)
        info = m["cachingproxy_build_info"]
        self.assertEqual(
            sample(info, "cachingproxy_build_info", version=__version__), 1
        )

    def test_registries_are_separate(self) -> None:
        """Each Stats has its own registry: two proxies in one process do not
        share counts, and nothing goes into the global default registry."""
        one, two = Fixture(), Fixture()
        one.request("HIT")
        count = "cachingproxy_requests_total"
        self.assertEqual(
            sample(families(one.stats)["cachingproxy_requests"], count, cache="HIT"), 1
        )
        self.assertEqual(
            sample(families(two.stats)["cachingproxy_requests"], count, cache="HIT"), 0
        )
        self.assertIsNone(REGISTRY.get_sample_value(count, {"cache": "HIT"}))

    def test_rendered_from_figures_alone(self) -> None:
        """Metrics needs only a Figures callable, called at each scrape (not
        a Stats); a store without a budget gives no max_size sample."""
        calls: list[int] = []

        def figures() -> Figures:
            calls.append(1)
            return Figures(
                by_cache={"HIT": 3},
                bytes_from_cache=10,
                bytes_from_upstream=20,
                upstream_errors={"dns": 2},
                disk_bytes=30,
                entries=4,
                max_size=None,
                in_flight=5,
            )

        holder = attrs.make_class("Holder", ["metrics"])(Metrics(figures))
        self.assertEqual(calls, [])
        m = families(holder)
        self.assertEqual(calls, [1])
        count = "cachingproxy_requests_total"
        self.assertEqual(sample(m["cachingproxy_requests"], count, cache="HIT"), 3)
        inflight = "cachingproxy_inflight_downloads"
        self.assertEqual(sample(m[inflight], inflight), 5)
        self.assertEqual(m["cachingproxy_max_size_bytes"].samples, [])

    def test_content_type(self) -> None:
        """The content type names the Prometheus text format."""
        self.assertTrue(CONTENT_TYPE.startswith("text/plain; version=0.0.4"))


def parse_page(page: str) -> ET.Element:
    """Parse the page strictly as XML (well-formedness), after the doctype."""
    doctype = "<!DOCTYPE html>\n"
    assert page.startswith(doctype), page[:40]
    return ET.fromstring(page[len(doctype) :])


def text_of(element: ET.Element) -> str:
    return "".join(element.itertext())


class StatusPageTests(SynchronousTestCase):
    def page(self, f: Fixture | None = None, **kwargs: Any) -> str:
        f = f or Fixture()
        return render_html(f.stats.snapshot(), **kwargs)

    def test_well_formed_and_refreshing(self) -> None:
        """The page parses as XML, is an HTML document and refreshes itself
        every ``refresh`` seconds."""
        f = Fixture()
        script(f)
        root = parse_page(self.page(f))
        self.assertEqual(root.tag, "html")
        [refresh] = [m for m in root.iter("meta") if m.get("http-equiv") == "refresh"]
        self.assertEqual(refresh.get("content"), "10")
        root = parse_page(self.page(f, refresh=30))
        [refresh] = [m for m in root.iter("meta") if m.get("http-equiv") == "refresh"]
        self.assertEqual(refresh.get("content"), "30")

    def test_unbounded_store(self) -> None:
        """A store without a budget (max_size None) shows its use without a
        bar, and /metrics leaves out the budget gauge."""
        f = Fixture()
        f.usage = Usage(bytes=2048, entries=1, max_size=None)
        self.assertIsNone(f.stats.snapshot()["max_size"])
        text = text_of(parse_page(self.page(f)))
        self.assertIn("2.0 KiB (no budget)", text)
        budget = families(f.stats)["cachingproxy_max_size_bytes"]
        self.assertEqual(budget.samples, [])

    def test_no_external_assets(self) -> None:
        """No scripts, no stylesheets or images from elsewhere."""
        root = parse_page(self.page())
        self.assertEqual(list(root.iter("script")), [])
        self.assertEqual(list(root.iter("link")), [])
        self.assertEqual(list(root.iter("img")), [])

    def test_shows_the_figures(self) -> None:
        """Uptime, counts, both hit ratios, bytes by source and disk use
        against the budget appear on the page."""
        f = Fixture()
        script(f)
        f.usage = Usage(bytes=512 * 1024, entries=42, max_size=1024 * 1024)
        f.clock.advance(3 * 3600 + 120)
        text = text_of(parse_page(self.page(f)))
        self.assertIn("up 3 h 2 min", text)
        self.assertIn("63.6%", text)  # 7/11 by requests
        self.assertIn("63.5%", text)  # 6000/9450 by bytes
        self.assertIn("5.9 KiB", text)  # from cache
        self.assertIn("3.3 KiB", text)  # from upstream
        self.assertIn("512.0 KiB of 1.0 MiB (50%)", text)
        self.assertIn("42", text)
        page = self.page(f)
        self.assertIn('style="width:50.0%"', page)

    def test_in_flight_download_escaped(self) -> None:
        """A download in flight is listed with its URL, escaped: a URL with
        ``<`` and ``&`` neither breaks the page nor injects markup."""
        f = Fixture()
        url = "http://evil.example/<script>alert(1)</script>?a=1&b=2"
        f.downloads.append(FakeDownload(url, 2048, 4096, 3, f.clock.seconds() - 2))
        page = self.page(f)
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;", page)
        self.assertIn("a=1&amp;b=2", page)
        root = parse_page(page)
        self.assertIn(url, text_of(root))
        self.assertEqual(list(root.iter("script")), [])
        row = next(tr for tr in root.iter("tr") if url in text_of(tr))
        cells = [text_of(td) for td in row.iter("td")]
        self.assertEqual(cells[1:3], ["2.0 KiB", "4.0 KiB"])
        self.assertEqual(cells[4], "1.0 KiB/s")
        self.assertEqual(cells[5], "3")

    def test_no_downloads_says_none(self) -> None:
        """With nothing in flight the section says "none"."""
        root = parse_page(self.page())
        heading = next(
            h for h in root.iter("h2") if text_of(h) == "Downloads in flight"
        )
        body = next(root.iter("body"))
        children = list(body)
        following = children[children.index(heading) + 1]
        self.assertEqual(text_of(following), "none")

    def test_usage_hint_names_the_host(self) -> None:
        """Given the request's Host, the page says how to use the proxy,
        with the Host escaped."""
        text = text_of(parse_page(self.page(host="cache:3128")))
        self.assertIn("http_proxy=http://cache:3128/", text)
        page = self.page(host="<x>&")
        self.assertIn("http://&lt;x&gt;&amp;/", page)
        self.assertNotIn("http_proxy", self.page())

    def test_hostile_hosts_and_objects_escaped(self) -> None:
        """Host names and URLs in the top lists are escaped too."""
        f = Fixture()
        f.request("HIT", host='"><b>x</b>', url="http://h/<i>&amp;")
        page = self.page(f)
        self.assertNotIn("<b>x</b>", page)
        self.assertNotIn("<i>", page)
        root = parse_page(page)
        self.assertIn("http://h/<i>&amp;", text_of(root))
        self.assertIn('"><b>x</b>', text_of(root))

    def test_history_chart(self) -> None:
        """The page holds an inline SVG with one bar per minute that had
        requests and a hit-ratio line."""
        f = Fixture(start=6000.0)
        for minute in range(5):
            for _ in range(minute + 1):
                f.request("HIT")
            f.request("MISS")
            f.clock.advance(60)
        page = self.page(f)
        self.assertIn("<svg", page)
        root = parse_page(page)
        [svg] = list(root.iter(SVG + "svg"))
        self.assertEqual(len(list(svg.iter(SVG + "rect"))), 5)
        [line] = list(svg.iter(SVG + "polyline"))
        self.assertEqual(len(line.get("points", "").split()), 5)

    def test_empty_history_chart(self) -> None:
        """An idle hour still draws a (blank) chart without bars."""
        root = parse_page(self.page())
        [svg] = list(root.iter(SVG + "svg"))
        self.assertEqual(list(svg.iter(SVG + "rect")), [])

    def test_formatting(self) -> None:
        """Sizes use powers of 1024 like --max-size; durations are short."""
        self.assertEqual(format_bytes(0), "0 B")
        self.assertEqual(format_bytes(1023), "1023 B")
        self.assertEqual(format_bytes(1536), "1.5 KiB")
        self.assertEqual(format_bytes(20 * 1024**3), "20.0 GiB")
        self.assertEqual(format_bytes(None), "?")
        self.assertEqual(format_duration(59), "59 s")
        self.assertEqual(format_duration(3725), "1 h 2 min")
        self.assertEqual(format_duration(2 * 86400 + 3600), "2 d 1 h")
