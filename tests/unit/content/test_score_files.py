"""How ``policyd score`` reads message files: whole, whatever their size, without an mbox From line."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.cli import content as score_command


@pytest.mark.parametrize("size", [0, 10, score_command.READ_FIRST - 1, score_command.READ_FIRST,
                                  score_command.READ_FIRST + 1, 3 * score_command.READ_FIRST + 7])
def test_a_file_is_read_whole_whatever_its_size(tmp_path: Path, size: int) -> None:
    """Files shorter, as long as and longer than the first read come back byte for byte."""
    body = bytes(range(256)) * (size // 256 + 1)
    message = b"Subject: x\n\n" + body[:size]
    path = tmp_path / "m.eml"
    path.write_bytes(message)
    assert score_command._read(str(path), str(path)) == message


def test_the_mbox_from_line_is_left_out(tmp_path: Path) -> None:
    """A file that starts with an mbox From line is read without it, even past the first read."""
    message = b"Subject: x\n\n" + b"y" * (2 * score_command.READ_FIRST)
    path = tmp_path / "m.eml"
    path.write_bytes(b"From alice@example.org Thu Dec  3 10:00:00 2026\n" + message)
    assert score_command._read(str(path), str(path)) == message


def test_an_unreadable_path_is_one_line_and_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file and a directory: None, and one line on standard error naming the path."""
    assert score_command._read("ghost.eml", str(tmp_path / "ghost.eml")) is None
    assert score_command._read("folder", str(tmp_path)) is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("policyd: error: ghost.eml: ") and "No such file" in lines[0]
    assert lines[1].startswith("policyd: error: folder: ") and "directory" in lines[1]


@pytest.mark.parametrize("path", ["/srv/mail/cur/1.eml", "a b/c:2,S", 'say "hi".eml', "back\\slash", "tab\there",
                                  "del\x7f", "été.eml", "bidi\u202e.eml", "nul\x00", "", "/"])
def test_a_path_is_written_as_json_line_writes_it(path: str) -> None:
    """The JSON string of a path written by policyd score --json is json_line's, quotes and controls escaped."""
    import json

    from policyd.cli.common import json_line

    assert score_command._json_path(path) == json_line(path)
    assert json.loads(score_command._json_path(path)) == path
