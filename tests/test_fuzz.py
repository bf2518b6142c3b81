"""Property-based runs (hypothesis) of hostile request lines, headers and URLs
through the real parser and router (SPEC 8): nothing crashes, every answer
is a well-formed status line, and malformed input is never forwarded.

Bounded and deterministic (``derandomize``, 200 examples each); the longer
run with fresh seeds is ``bench/fuzz.py``.  The generators and properties
are in ``tests/fuzzing.py``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from twisted.trial.unittest import TestCase

from .fuzzing import (
    check_request,
    check_router,
    check_smuggling,
    requests,
    router_inputs,
    smuggling,
)

BOUNDED = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class ParserFuzzTests(TestCase):
    @BOUNDED
    @given(requests())
    def test_arbitrary_requests(self, chunks: list[bytes]) -> None:
        """Arbitrary request lines, headers, line endings and bodies, cut
        into chunks anywhere, fed to the real channel, site and proxy: no
        exception escapes, no 5xx, and whatever is answered starts with a
        well-formed 1xx-5xx status line."""
        self.assertEqual(check_request(chunks), [], b"".join(chunks)[:300])

    @BOUNDED
    @given(smuggling())
    def test_smuggling_never_forwarded(
        self, case: tuple[str | None, list[bytes]]
    ) -> None:
        """A valid request with one smuggling shape worked in is answered
        with one 4xx and nothing (not even the request piggy-backed after
        it) reaches the upstream; without a shape the same request and the
        one behind it are both forwarded (so the harness does see
        forwarding)."""
        self.assertEqual(check_smuggling(case), [], b"".join(case[1])[:300])


class RouterFuzzTests(TestCase):
    @BOUNDED
    @given(router_inputs)
    def test_classify(
        self, case: tuple[str, str, str | None, tuple[str, int] | None]
    ) -> None:
        """``routing.classify`` either routes or raises BadRequest, nothing
        else; forward and transparent URLs are normalised (normalising again
        changes nothing) http(s) URLs, and own-page paths start with /."""
        self.assertEqual(check_router(case), [], case)
