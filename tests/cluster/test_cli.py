"""The `terrahash` command: help texts, and the lean imports serving relies on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.cli.main import build_parser, main


def test_every_subcommand_explains_itself(capsys):
    for command in ([], ["train"], ["eval"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage: terrahash" in text
    parser = build_parser()
    assert {"train", "eval"} <= set(parser._subparsers._group_actions[0].choices)


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_metrics_and_serving_import_no_torch():
    code = ("import sys, cluster.cli.main, serving, evaluation.metrics, evaluation.retrieval; "
            "heavy = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_a_command_prints_no_model_loading_bars(trained, subset, tmp_path):
    """The text encoder's "Loading weights" bar is off unless --verbose; the command's own output stays."""
    command = [sys.executable, "-m", "cluster.cli.main", "eval", "--model", str(trained / "run"), "--data", str(subset),
               "--cache-dir", str(trained / "cache")]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "map_all" in result.stdout and "Loading weights" not in result.stderr
    verbose = subprocess.run(command[:3] + ["--verbose"] + command[3:], capture_output=True, text=True, env=env,
                             timeout=300)
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr  # the bar is real, and only muted
