"""The iso-gateway command: decode, encode, dialects, check-config; clear one-line errors; docs kept true."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iso_gateway.cli import main
from iso_gateway.config import reference_markdown
from iso_gateway.specfiles import get_dialect
from iso_gateway.core.framing import framer_from_config
from iso_gateway.core.message import encode

ROOT = Path(__file__).resolve().parent.parent
PAN = "4761739001010119"
AUTH = {"t": "0100", "2": PAN, "3": "000000", "4": "000000015000", "7": "1127103000", "11": "000123",
        "14": "2812", "35": PAN + "=28121010000000000", "41": "TERM0001", "42": "MERCHANT0000001", "49": "504"}


def hex_of(msg, dialect="iso87ascii"):
    return encode(get_dialect(dialect), msg).hex()


def test_decode_prints_named_fields_with_the_pan_masked_and_track_data_removed(capsys):
    assert main(["decode", hex_of(AUTH)]) == 0
    out = capsys.readouterr().out
    assert "476173******0119" in out and PAN not in out
    assert "Track 2 data" in out and "[removed]" in out and "=2812" not in out
    assert "System trace audit number" in out and "000123" in out
    assert re.search(r"14\s+n4\s+Date, expiration.*\*\*\*\*", out)


def test_decode_json_is_machine_readable(capsys):
    assert main(["decode", "--json", hex_of(AUTH)]) == 0
    doc = json.loads(capsys.readouterr().out)
    fields = {row["field"]: row for row in doc["fields"]}
    assert fields["t"]["value"] == "0100" and fields["2"]["value"] == "476173******0119"
    assert fields["4"]["format"] == "n12"


def test_unmasked_shows_the_pan_and_warns_on_stderr(capsys):
    assert main(["decode", "--unmasked", hex_of(AUTH)]) == 0
    captured = capsys.readouterr()
    assert PAN in captured.out and "WARNING" in captured.err


def test_decode_reads_a_framed_stream_of_several_messages(capsys, tmp_path):
    framer = framer_from_config("binary2", tpdu=True)
    stream = b"".join(framer.encode(bytes.fromhex(hex_of({**AUTH, "11": f"{i:06d}"}, "iso87binary")),
                                    header=bytes.fromhex("6000030000")) for i in (1, 2, 3))
    path = tmp_path / "capture.bin"
    path.write_bytes(stream)
    assert main(["decode", "--dialect", "iso87binary", "--framing", "binary2", "--tpdu", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("--- message") == 3 and "header 6000030000" in out and PAN not in out


def test_encode_then_decode_round_trips(capsys):
    assert main(["encode", '{"t": "0800", "7": "1127103000", "11": "000001", "70": "301"}']) == 0
    hexed = capsys.readouterr().out.strip()
    assert main(["decode", hexed]) == 0
    assert "Network management information code" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["decode", "zz"], "not hexadecimal"),
    (["decode", "3031"], "MTI"),
    (["decode", hex_of(AUTH)[:-6]], "field"),
    (["decode", "--dialect", "nope", "3031"], "unknown dialect"),
    (["decode", "--framing", "ascii4", "30303939"], "left after"),
    (["decode", "--framing", "morse", "30"], "unknown framing"),
    (["encode", "{not json"], "not JSON"),
    (["encode", '{"t": "0100", "2": "47617390010101191234"}'], "field 2"),
    (["encode", '{"t": "0100", "11": "12345X"}'], "field 11"),
])
def test_bad_input_is_one_clear_line_and_a_non_zero_exit(argv, needle, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert PAN not in err


def test_dialects_lists_every_shipped_dialect(capsys):
    assert main(["dialects"]) == 0
    out = capsys.readouterr().out
    for name in ("iso87ascii", "iso87binary", "iso93ascii"):
        assert name in out


def test_check_config_accepts_the_example_and_names_the_key_of_a_bad_one(tmp_path, capsys):
    assert main(["check-config", str(ROOT / "deploy" / "gateway.toml")]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "deploy" / "gateway.toml").read_text().replace("max_in_flight = 64", "max_in_flight = -1"))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml: listeners.0.max_in_flight:" in err


def test_the_console_script_runs_without_a_traceback_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "iso_gateway", "decode", "00"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.startswith("iso-gateway:")


def test_the_readme_configuration_reference_is_generated_from_the_models():
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- config-reference:start -->\n", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    assert section == reference_markdown(), "regenerate the README table from iso_gateway.config.reference_markdown()"


def test_the_readme_starts_with_the_two_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert lines[0].endswith("iso-gateway demo")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines[1] in ci  # the README's test command, word for word, as a line of its own


def test_check_config_reads_the_tls_files_and_names_the_one_that_does_not_load(tmp_path, capsys):
    text = (ROOT / "deploy" / "gateway.toml").read_text()
    missing = tmp_path / "nowhere.crt"
    bad = tmp_path / "tls.toml"
    bad.write_text(text.replace("[[upstreams]]", f'[listeners.tls]\ncert_chain = "{missing}"\nkey = "{missing}"\n\n[[upstreams]]', 1))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tls" in err and "nowhere.crt" in err
