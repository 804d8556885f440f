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


def test_default_compile_cache_follows_the_environment(monkeypatch, tmp_path):
    from tfhybrid.cli.main import default_compile_cache

    monkeypatch.delenv("TFHYBRID_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_compile_cache() == str(tmp_path / "xdg" / "tfhybrid" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_compile_cache() == str(tmp_path / "home" / ".cache" / "tfhybrid" / "xla")
    monkeypatch.setenv("TFHYBRID_COMPILE_CACHE", "off")
    assert default_compile_cache() == "off"


@pytest.mark.parametrize("how", ["default", "off"])
def test_the_command_uses_a_compile_cache_by_default(tmp_path, how):
    """In a fresh process the command enables the cache in its default location (or not, with
    --compile-cache off); its staging directory is gone when it exits. (--compile-cache DIR
    calls the same function with DIR: tests/physics/test_xla.py.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TFHYBRID_COMPILE_CACHE",
                                                            "TF_XLA_FLAGS")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), TF_CPP_MIN_LOG_LEVEL="2")
    option = {"default": [], "off": ["--compile-cache", "off"]}[how]
    argv = [sys.executable, "-m", "tfhybrid", *option, "data", "simulate", "--n", "2",
            "--stamp-size", "16", "--workers", "1", "--no-progress", "--out",
            str(tmp_path / "sim")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if how == "off":
        assert not (tmp_path / "xdg" / "tfhybrid").exists()
        return
    (keyed,) = (tmp_path / "xdg" / "tfhybrid" / "xla").iterdir()
    assert keyed.name.startswith("tf") and not list(keyed.glob(".staging-*"))


def test_cache_info_and_clear(capsys, tmp_path):
    """`cache info` counts the programs per key; `cache clear` deletes them and a killed
    process's staging directory but leaves a running one's (this process's id) and any file
    that is not the cache's own."""
    import os
    import socket

    root = tmp_path / "cc"
    keyed = root / "tf2.99.0-x86_64-abc"
    keyed.mkdir(parents=True)
    for i, size in enumerate((1000, 3000)):
        (keyed / f"xla_compile_cache__{i}__XLA_CPU_JIT.pb").write_bytes(b"x" * size)
    host = socket.gethostname().replace("-", "_")
    live = keyed / f".staging-{host}-{os.getpid()}-live"
    dead = keyed / f".staging-{host}-999999999-dead"
    for d in (live, dead):
        d.mkdir()
    (root / "notes.txt").write_text("mine")

    assert main(["--compile-cache", str(root), "cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "2 programs, 0.0 MB" in out and "tf2.99.0-x86_64-abc: 2 programs" in out
    assert "2 staging" in out

    assert main(["--compile-cache", str(root), "cache", "clear"]) == 0
    assert "removed 2 programs" in capsys.readouterr().out
    assert not list(keyed.glob("*.pb")) and live.exists() and not dead.exists()
    assert (root / "notes.txt").read_text() == "mine"

    assert main(["--compile-cache", "off", "cache", "info"]) == 0
    assert "off" in capsys.readouterr().out
    assert main(["--compile-cache", str(tmp_path / "none"), "cache", "info"]) == 0
    assert "0 programs" in capsys.readouterr().out
    assert main(["cache"]) == 2  # no action: its help


@pytest.mark.parametrize("given, argv, want", [
    (None, [], "3"),            # the default: TensorFlow's C++ errors hidden
    ("1", [], "1"),             # the user's own level wins
    (None, ["--debug"], None),  # --debug leaves TensorFlow's logging alone
])
def test_tensorflow_log_level(monkeypatch, capsys, given, argv, want):
    """The command hides TensorFlow's C++ log up to ERROR: a warm compile cache makes
    TensorFlow log a spurious text-format parse error for every program it loads."""
    import os

    if given is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", given)
    assert main(argv) == 0  # no subcommand: the help
    capsys.readouterr()
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == want
