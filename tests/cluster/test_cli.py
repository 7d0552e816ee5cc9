"""The `terrahash` command: help texts, and the lean imports serving relies on."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.cli import build_parser, main


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
    code = ("import sys, cluster.cli, serving, evaluation.metrics, evaluation.retrieval; "
            "heavy = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
