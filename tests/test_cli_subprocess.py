"""The command line's contract: exit codes and one-line errors, never a traceback."""
from __future__ import annotations

import pytest

from relprop.cli import main
from tests.conftest import assert_cli_error, run_relprop


def test_module_entry_point_and_usage_error():
    result = run_relprop("explain")          # argparse: images and --model missing
    assert_cli_error(result, 2, "--model")


@pytest.mark.parametrize("raised, code, phrase", [
    (ZeroDivisionError("x"), 1, "internal error: ZeroDivisionError: x (rerun with RELPROP_DEBUG=1"),
    (KeyboardInterrupt(), 130, "relprop: interrupted"),
])
def test_unexpected_exceptions_are_one_line(monkeypatch, capsys, raised, code, phrase):
    import relprop.demo

    def fail(args):
        raise raised

    monkeypatch.delenv("RELPROP_DEBUG", raising=False)
    monkeypatch.setattr(relprop.demo, "run", fail)
    assert main(["demo"]) == code
    err = capsys.readouterr().err
    assert phrase in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(monkeypatch):
    import relprop.demo

    monkeypatch.setenv("RELPROP_DEBUG", "1")
    monkeypatch.setattr(relprop.demo, "run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["demo"])


def test_demo_bad_arguments(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("keep me")
    assert_cli_error(run_relprop("demo", "--out", taken), 2, f"--out '{taken}' is a file, not a folder")
    assert taken.read_text() == "keep me"
    assert_cli_error(run_relprop("demo", "--count", "0", "--out", tmp_path / "o"), 2, "argument --count: expected a positive integer, got '0'")
    assert_cli_error(run_relprop("demo", "--method", "bogus", "--out", tmp_path / "o"), 2, "invalid choice: 'bogus'")
    assert not (tmp_path / "o").exists()
