"""Route lookup cost with a large BIN table: prints µs per lookup, asserts nothing.

    python bench/bench_routing.py

Builds 5,000 BIN entries (prefixes of 4 to 8 digits and 6- and 8-digit ranges,
some overlapping) over 50 routes, plus criteria-filtered and catch-all routes,
then times lookups for PANs that hit a long prefix, a range, the catch-all and
no route at all.
"""

from __future__ import annotations

import random
import timeit

from iso_gateway.config import RouteConfig, RoutingConfig, route_table

ENTRIES = 5_000
ROUTES = 50


def build(rng: random.Random) -> tuple[list[RouteConfig], list[str]]:
    bins: list[list[str]] = [[] for _ in range(ROUTES)]
    for k in range(ENTRIES):
        kind = rng.random()
        if kind < 0.6:
            n = rng.choice([4, 6, 6, 8])
            entry = str(rng.randrange(10 ** (n - 1) * 3, 10**n)).zfill(n)
        else:
            n = rng.choice([6, 8])
            low = rng.randrange(10 ** (n - 1) * 3, 10**n - 10 ** (n - 3))
            entry = f"{low}-{low + rng.randrange(1, 10 ** (n - 3))}"
        bins[k % ROUTES].append(entry)
    routes = [
        RouteConfig(name=f"r{i}", upstream=f"switch{i % 4}", bins=b, currencies=["504"] if i % 5 == 0 else [])
        for i, b in enumerate(bins)
    ]
    routes.append(RouteConfig(name="network", upstream="switch0", mti=["0800"]))
    routes.append(RouteConfig(name="default", upstream="switch0", mti=["0100", "0200"], currencies=["504", "978"]))
    samples = [e.partition("-")[0] for b in bins for e in b]
    return routes, samples


def pan_from(prefix: str, rng: random.Random) -> str:
    return prefix + "".join(rng.choice("0123456789") for _ in range(16 - len(prefix)))


def main() -> None:
    rng = random.Random(8583)
    routes, samples = build(rng)
    t0 = timeit.default_timer()
    table = route_table(routes, RoutingConfig())
    build_ms = (timeit.default_timer() - t0) * 1e3
    print(f"{ENTRIES} BIN entries over {len(routes)} routes, table built in {build_ms:.1f} ms")

    cases = {
        "BIN in the table": [pan_from(rng.choice(samples), rng) for _ in range(1000)],
        "random PAN (catch-all)": [pan_from(str(rng.randrange(3, 10)), rng) for _ in range(1000)],
    }
    for label, pans in cases.items():
        n = 200_000
        it = iter(pans * (n // len(pans)))
        lookup = table.lookup
        secs = timeit.timeit(lambda: lookup("0100", next(it), "978", "TERM0001", "MERCHANT0000001"), number=n)
        print(f"{label:28s} {secs / n * 1e6:.2f} µs/lookup")

    n = 200_000
    lookup = table.lookup
    pan = pan_from("12", rng)
    secs = timeit.timeit(lambda: lookup("0100", pan, "840", "TERM0001", "MERCHANT0000001"), number=n)
    print(f"{'no route (unknown BIN)':28s} {secs / n * 1e6:.2f} µs/lookup   -> {lookup('0100', pan, '840', None, None)}")
    secs = timeit.timeit(lambda: lookup("0800", None, None, "TERM0001", None), number=n)
    print(f"{'0800 without PAN':28s} {secs / n * 1e6:.2f} µs/lookup")
    secs = timeit.timeit(lambda: None, number=n)
    print(f"{'(empty lambda overhead)':28s} {secs / n * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
