#!/usr/bin/env python3
"""Longer fuzz run of the parser and router, with fresh seeds.

Run from a checkout, with a Python that has the project's test extra::

    python bench/fuzz.py --minutes 1
    python bench/fuzz.py --minutes 30 --seed 1234    # reproducible batches

Runs the generators of ``tests/test_fuzz.py`` (``tests/fuzzing.py``) in
batches for the given wall-clock time, each batch with its own seed drawn
from ``--seed``: arbitrary requests through the real channel, site and proxy
(a recording upstream that refuses everything; nothing leaves the process),
smuggling shapes that must be a 4xx and never forwarded, and the router
(``routing.classify``) on its own.  A crash is an exception, a 5xx from the
parser or router, a malformed status line, or a broken property; each is
shrunk by hypothesis and printed once with a reproducer.  Exits 1 if any.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzing import (  # noqa: E402
    check_request,
    check_router,
    check_smuggling,
    requests,
    router_inputs,
    smuggling,
)

BATCH = 300
"""Examples per batch (a second or two each); the clock is read between."""

TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], list[str]]]] = {
    "requests": (requests(), check_request),
    "smuggling": (smuggling(), check_smuggling),
    "router": (router_inputs, check_router),
}


class Crash(Exception):
    """A property did not hold (raised so that hypothesis shrinks it)."""


def reproducer(name: str, case: Any) -> str:
    """Python that replays ``case`` (run from the checkout)."""
    if name == "router":
        return f"from tests.fuzzing import check_router\nprint(check_router({case!r}))"
    if name == "smuggling":
        return (
            "from tests.fuzzing import check_smuggling\n"
            f"print(check_smuggling({case!r}))"
        )
    return f"from tests.fuzzing import check_request\nprint(check_request({case!r}))"


def run_batch(
    name: str, batch_seed: int, examples: int, counts: dict[str, int]
) -> tuple[list[str], str] | None:
    """One hypothesis run of ``examples``; the shrunk failure, if any."""
    strategy, check = TARGETS[name]
    last: list[tuple[list[str], Any]] = []

    @seed(batch_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        report_multiple_bugs=False,
    )
    @given(strategy)
    def property_holds(case: Any) -> None:
        counts[name] += 1
        problems = check(case)
        if problems:
            last.append((problems, case))
            raise Crash("; ".join(problems))

    try:
        property_holds()
    except Crash:
        problems, case = last[-1]  # hypothesis replays the shrunk case last
        return problems, reproducer(name, case)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args(argv)
    master = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(master)
    print(f"fuzzing for {args.minutes:g} min, --seed {master}", flush=True)
    warnings.simplefilter("ignore")
    counts = dict.fromkeys(TARGETS, 0)
    crashes: dict[tuple[str, str], tuple[list[str], str, int]] = {}
    started = time.monotonic()
    deadline = started + args.minutes * 60
    batches = 0
    while time.monotonic() < deadline:
        for name in TARGETS:
            if time.monotonic() >= deadline:
                break
            batch_seed = rng.randrange(2**32)
            found = run_batch(name, batch_seed, args.batch, counts)
            batches += 1
            if found is None:
                continue
            problems, code = found
            key = (name, problems[0].split(":")[0][:80])
            if key not in crashes:
                crashes[key] = (problems, code, batch_seed)
                print(f"CRASH in {name} (batch seed {batch_seed}):", flush=True)
                for problem in problems:
                    print(f"  {problem[:2000]}")
                print("  reproducer:\n    " + code.replace("\n", "\n    "), flush=True)
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    print(
        f"ran {total} cases in {elapsed:.0f} s ({total / max(elapsed, 1e-9):.0f}/s)"
        f" in {batches} batches: "
        + ", ".join(f"{name} {count}" for name, count in counts.items())
    )
    print(f"crashes: {len(crashes)}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
