"""Codec micro-benchmark: µs per decode, encode, scan and splice of a typical 16-field 0100, per dialect.

Run: python bench/bench_codec.py [--number N]
Prints a table; makes no assertions. Ratios are measured in the same run, so they hold
on a noisy machine better than the absolute figures do.
"""

from __future__ import annotations

import argparse
import platform
import timeit
from typing import Callable

from iso_gateway.specfiles import dialect_paths, get_dialect
from iso_gateway.core.message import decode, encode
from iso_gateway.core.scanner import Scanner

AUTH_87 = {
    "t": "0100", "2": "4761739001010119", "3": "000000", "4": "000000015000", "7": "1127103000",
    "11": "000123", "12": "113000", "13": "1127", "14": "2812", "18": "5999", "22": "812", "25": "59",
    "32": "123456", "37": "633110000123", "41": "TERM0001", "42": "MERCHANT0000001", "49": "504",
}


def sample(dialect_name: str) -> dict[str, str]:
    d = get_dialect(dialect_name)
    msg = {"t": "1100" if d.standard == "1993" else "0100"}
    for key, value in AUTH_87.items():
        if key == "t":
            continue
        fd = d.fields.get(int(key))
        if fd is None:
            continue
        if fd.fixed and len(value) != fd.length:
            value = (value * 10)[: fd.length] if fd.type != "n" else value.zfill(fd.length)[-fd.length:]
        msg[key] = value
    return msg


def best(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--number", type=int, default=5000)
    args = ap.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}; best of 5 x {args.number}")
    print(f"{'dialect':<12} {'fields':>6} {'decode':>8} {'encode':>8} {'scan':>8} {'splice':>8} {'(dec+enc)/(scan+splice)':>24}")
    for name in dialect_paths():
        d = get_dialect(name)
        msg = sample(name)
        raw = encode(d, msg)
        scanner = Scanner(d, {11, 37, 38, 39, 41, 42})
        scan = scanner.scan(raw)
        stan = "0" * (d.fields[11].length - 1) + "7"
        t_dec = best(lambda: decode(d, raw, check_types=False), args.number)
        t_enc = best(lambda: encode(d, msg, check_types=False), args.number)
        t_scan = best(lambda: scanner.scan(raw), args.number)
        t_splice = best(lambda: scanner.splice(raw, scan, 11, stan), args.number)
        ratio = (t_dec + t_enc) / (t_scan + t_splice)
        print(f"{name:<12} {len(msg) - 1:>6} {t_dec:>7.1f}µ {t_enc:>7.1f}µ {t_scan:>7.2f}µ {t_splice:>7.2f}µ {ratio:>23.1f}x")


if __name__ == "__main__":
    main()
