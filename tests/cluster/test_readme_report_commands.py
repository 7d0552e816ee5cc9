"""The `terrahash report` and `terrahash jscc ...` commands as the READMEs and docs/results.md write
them, run on tiny data: every runs/NAME they name is a copy of one tiny trained run, the jscc config a
tiny one, and the peer benchmark small (--peer-codes); nothing else of the command is changed."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import yaml

from cluster.cli.main import main
from tests.cluster.test_readme_training_commands import commands

TINY_JSCC = {"name": "jscc-tiny", "image_size": 48, "c_out": 4, "width": 8, "hops": [1, 3], "epochs": 1,
             "batch_size": 4, "hasher": "teacher", "snr_eval_db": [-5.0], "qf_grid": [[2, 1.0]],
             "code_link": {"uses": [64], "hidden": 16, "steps": 6, "eval_every": 3, "batch_size": 8}}


def localize(command: str, runs, trained, extra: dict) -> list[str]:
    words = shlex.split(command)[1:]
    out = []
    for i, word in enumerate(words):
        flag = words[i - 1] if i else ""
        if flag == "--config" and words[0] == "jscc":
            word = extra["jscc_config"]
        elif word.startswith("runs/"):
            target = runs / word[len("runs/"):]
            if (words[0] == "report" and flag != "--links") or flag == "--hasher":
                if not target.exists():
                    shutil.copytree(trained / "run", target)
                if flag == "--hasher" and not (target / "students" / "onnx").exists():  # the code links' student
                    shutil.copytree(extra["students"], target / "students" / "onnx")
            word = str(target)
        elif flag in ("--out", "--json") or word.endswith((".json", "/")) and flag not in ("--model",):
            word = str(runs.parent / word.strip("/"))
        out.append(word)
    if words[0] == "report":
        out += ["--data", extra["data"], "--cache-dir", str(trained / "cache"), "--peer-codes", "3000", "--device", "cpu"]
    elif words[1] in ("train", "eval"):
        out += ["--data", extra["data"], "--no-track", "--device", "cpu"]
    return out


def test_the_readmes_report_and_jscc_commands_run(trained, subset, model_dir, tmp_path, capsys):
    shown = [c.removeprefix(".venv/bin/") for c in commands(r"(?:\.venv/bin/)?terrahash (?:report|jscc (?:train|eval|send))\b")
             if "..." not in c and len(c.split()) > 3]  # not the prose's "report ... --peers FILE" nor a bare name
    assert any(c.startswith("terrahash report --models") for c in shown)
    assert {c.split()[2] for c in shown if c.split()[1] == "jscc"} == {"train", "eval", "send"}
    config = tmp_path / "jscc.yaml"
    config.write_text(yaml.safe_dump(TINY_JSCC))
    runs = tmp_path / "runs"
    runs.mkdir()
    order = ["report", "train", "eval", "send", "report --links"]  # a report of jscc links after their eval

    def step(command: str) -> int:
        words = command.split()
        return order.index(("report --links" if "--links" in words else "report") if words[1] == "report"
                           else words[2])

    for command in sorted(shown, key=step):
        argv = localize(command, runs, trained, {"jscc_config": str(config), "data": str(subset),
                                                 "students": model_dir})
        assert main(argv) == 0, (command, argv, capsys.readouterr())
        if argv[0] == "report":
            written = json.loads((Path(argv[argv.index("--out") + 1]) / "report.json").read_text())
            models = command.split("--models")[1].split("--")[0]
            assert len(written["code_length"]["order"]) == models.count("runs/")
            assert ("field_links" in written) == ("--links" in command)
