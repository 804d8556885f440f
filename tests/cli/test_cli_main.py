"""Tests of the ``tfhybrid`` entry point: help texts, exit codes, one-line errors."""

from __future__ import annotations

import pytest

from tfhybrid.cli.main import main

DATA_ACTIONS = ("simulate", "cosmos", "preprocess", "show")


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_the_subcommands(capsys):
    text = _help(capsys)
    assert text.startswith("usage: tfhybrid")
    assert "data" in text and "--debug" in text


def test_no_command_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    assert "usage: tfhybrid" in capsys.readouterr().out


def test_data_help_lists_its_actions(capsys):
    text = _help(capsys, "data")
    for action in DATA_ACTIONS:
        assert action in text


def test_data_without_action_prints_help_and_fails(capsys):
    assert main(["data"]) == 2
    assert "simulate" in capsys.readouterr().out


@pytest.mark.parametrize("action", DATA_ACTIONS)
def test_every_data_action_has_help(capsys, action):
    text = _help(capsys, "data", action)
    assert text.startswith(f"usage: tfhybrid data {action}")
    assert "--out" in text


def test_version(capsys):
    from tfhybrid import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["data", "show", "--in", str(tmp_path / "none.fits"), "--out",
                 str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("tfhybrid data: error:") and "none.fits does not exist" in err
    assert "--debug" in err
