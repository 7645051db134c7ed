"""The fuzz targets (fuzz/targets.py) for a few seconds: hypothesis bytes, alone and as mutations
of the captures. The long, coverage-guided run is fuzz/fuzz_wire.py (README, Development)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fuzz/ folder at the repository root

from fuzz import targets

SEEDS = list(targets.seeds())
KINDS = sorted({name.split("/")[0] for name, _ in targets.TARGETS})
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_every_target_has_seeds_from_the_captures_and_every_seed_passes():
    picked = {targets.TARGETS[s[0] % len(targets.TARGETS)][0] for s in SEEDS}
    assert picked == {name for name, _ in targets.TARGETS}
    for seed in SEEDS:
        targets.run_one(seed)


@st.composite
def mutated_seed(draw, kind: str):
    """A capture for a target of ``kind``, with a few bytes flipped, inserted or cut."""
    chosen = set(targets.selector(kind))
    data = bytearray(draw(st.sampled_from([s for s in SEEDS if s[0] in chosen])))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(1, len(data)))
        op = draw(st.integers(0, 2))
        if op == 0 and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            data[i:i] = draw(st.binary(min_size=1, max_size=3))
        else:
            del data[i:i + draw(st.integers(1, 16))]
    return bytes(data)


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_mutated_captures_keep_every_property(kind, data):
    targets.run_one(data.draw(mutated_seed(kind)))


@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_random_bytes_keep_every_property(kind, data):
    first = data.draw(st.sampled_from(targets.selector(kind)))
    targets.run_one(bytes([first]) + data.draw(st.binary(max_size=300)))


def test_the_fuzz_script_replays_an_input_and_reports(tmp_path):
    import subprocess
    script = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_wire.py"
    path = tmp_path / "input"
    path.write_bytes(SEEDS[0])
    out = subprocess.run([sys.executable, str(script), "--replay", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all replayed inputs pass" in out.stdout
