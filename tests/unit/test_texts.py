"""Outside text on its way to a terminal: the one rule, and JSON lines that keep to it."""

from __future__ import annotations

import json

from policyd.cli.common import json_line
from policyd.texts import printable


def test_controls_and_bidi_overrides_are_written_out() -> None:
    """C0 and C1 controls, DEL, bidi overrides, separators and stray bytes become visible \\x{..}."""
    assert printable("a\x1b[2Jb") == "a\\x{1b}[2Jb"
    assert printable("\x1b]52;c;YQ==\x07") == "\\x{1b}]52;c;YQ==\\x{7}"
    assert printable("x\x9b2J\x7f\r\x08") == "x\\x{9b}2J\\x{7f}\\x{d}\\x{8}"
    assert printable("invoice\u202efdp.exe") == "invoice\\x{202e}fdp.exe"
    assert printable("one\u2028two\tthree\n") == "one\\x{2028}two\\x{9}three\\x{a}"
    assert printable("caf\udce9") == "caf\\x{dce9}"


def test_ordinary_text_is_left_alone() -> None:
    """Accents, other scripts and emoji are printed as they are; keep spares the named characters."""
    for text in ("Réunion à 14h", "会议通知", "Встреча", "🎉 offer", ""):
        assert printable(text) == text
    assert printable("line one\n\tline two\x1b", keep="\n\t") == "line one\n\tline two\\x{1b}"


def test_json_lines_carry_no_raw_control_and_read_back_the_same() -> None:
    """--json escapes DEL, C1, bidi and astral format characters as \\u, and the value reads back unchanged."""
    value = {"subject": "a\x1b\x7f\x9b\u202eé漢🎉\U000e0001\udcff", "n": 1}
    line = json_line(value)
    assert line.isascii() is False  # readable text stays readable
    assert all(c.isprintable() for c in line)
    assert "\\u009b" in line and "\\u202e" in line and "\\udb40\\udc01" in line
    assert json.loads(line) == value
    assert "\n" not in line
