"""Coverage-guided fuzzing of everything that reads a peer's bytes (fuzz/targets.py says what).

    pip install -e '.[fuzz]'                       # atheris (libFuzzer for Python)
    python fuzz/fuzz_wire.py --runs 1000000        # about 10^6 inputs; stops at the first failure
    python fuzz/fuzz_wire.py --seconds 3600 --corpus var/fuzz-corpus

The corpus directory starts with the captures under tests/captures (one input per
capture per target) and keeps every input that reached new code; a failing input is
written under --artifacts (crash-<hash>) and can be replayed with
``python fuzz/fuzz_wire.py --replay FILE``. Without atheris the script says so and
falls back to random mutation of the seeds, which is not coverage-guided.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fuzz.targets, run from anywhere

try:
    import atheris
except ImportError:  # optional extra "fuzz"
    atheris = None


def _import_targets() -> ModuleType:
    if atheris is None:
        from fuzz import targets
        return targets
    # Instrument the code under test (and pyiso8583, which it drives) for coverage feedback.
    with atheris.instrument_imports(include=["iso_gateway", "iso8583", "fuzz"]):
        from fuzz import targets
    return targets


def _write_seeds(targets: ModuleType, corpus: Path) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    n = 0
    for seed in targets.seeds():
        (corpus / ("seed-" + hashlib.sha1(seed).hexdigest())).write_bytes(seed)
        n += 1
    return n


def _random_fallback(targets: ModuleType, corpus: Path, runs: int, seconds: float, seed: int) -> int:
    """Not coverage-guided: random byte mutations of the corpus, for machines without atheris."""
    rng = random.Random(seed)
    pool = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
    deadline = time.monotonic() + seconds if seconds else None
    done = 0
    while (not runs or done < runs) and (deadline is None or time.monotonic() < deadline):
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            i = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(i, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            elif op == 2:
                del data[i:i + rng.randint(1, 8)]
            else:
                data[0:1] = bytes([rng.randrange(256)])
        targets.run_one(bytes(data))
        done += 1
        if done % 100_000 == 0:
            print(f"#{done} inputs", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=0, help="inputs to run (0: until --seconds or a failure)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0: no limit)")
    ap.add_argument("--corpus", type=Path, default=ROOT / "fuzz" / "corpus", help="corpus directory (default fuzz/corpus)")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "fuzz" / "artifacts", help="where failing inputs go")
    ap.add_argument("--seed", type=int, default=0, help="random seed (0: libFuzzer picks)")
    ap.add_argument("--replay", type=Path, nargs="*", help="run these inputs once each and report")
    args = ap.parse_args(argv)
    targets = _import_targets()
    if args.replay:
        for path in args.replay:
            data = path.read_bytes()
            name = targets.TARGETS[data[0] % len(targets.TARGETS)][0] if data else "-"
            print(f"{path}: target {name}", flush=True)
            targets.run_one(data)
        print("all replayed inputs pass")
        return 0
    seeded = _write_seeds(targets, args.corpus)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    print(f"{len(targets.TARGETS)} targets, {seeded} seeds from the captures, corpus {args.corpus}", flush=True)
    if atheris is None:
        print("atheris is not installed (pip install -e '.[fuzz]'): random mutation, NOT coverage-guided",
              flush=True)
        done = _random_fallback(targets, args.corpus, args.runs, args.seconds, args.seed)
        print(f"done: {done} inputs, no failure")
        return 0
    flags = [sys.argv[0], str(args.corpus), f"-artifact_prefix={args.artifacts}/", "-max_len=4096",
             "-print_final_stats=1"]
    if args.runs:
        flags.append(f"-runs={args.runs}")
    if args.seconds:
        flags.append(f"-max_total_time={int(args.seconds)}")
    if args.seed:
        flags.append(f"-seed={args.seed}")
    atheris.Setup(flags, targets.run_one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
