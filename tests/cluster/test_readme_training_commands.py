"""The `terrahash train|distill|eval|summarize` commands as the READMEs and docs/results.md write them, run on tiny data, and
every `python -m evaluation.*` benchmark they show, asked for its --help (the benchmarks themselves are long).

Only what makes them small changes: the shipped config names become tiny random-tower configs, `runs/`
becomes a temporary folder, `--data` a few real images, N a small number; tracking, which has tests of its
own, is off unless the command names a server, which is then a real local one.
"""
from __future__ import annotations

import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from cluster.cli.main import main  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
READMES = [REPO / "README.md", REPO / "training" / "README.md", REPO / "evaluation" / "README.md",
           REPO / "docs" / "results.md"]
TRAINING = r"terrahash (?:train|distill|eval|summarize)\b"
TINY_STUDENTS = {
    "name": "tiny-students",
    "image": {"backbone": "test_efficientnet", "weights": "none", "image_size": 64, "pool_levels": [],
              "head_hidden": [32], "epochs": 2, "batch_size": 6, "views": [0, 5], "lr": 3e-3},
    "text": {"num_layers": 1, "epochs": 1, "batch_size": 16, "lr": 1e-3},
    "eval_every": 1, "device": "cpu", "warmup_epochs": 0, "tracking": {"enabled": False},
}


def commands(pattern: str) -> list[str]:
    """Commands matching ``pattern`` in the READMEs' bash blocks and inline code spans (spans that show
    alternatives with "|" or only a command's name are left out; "a && b" is two commands)."""
    found = []
    for path in READMES:
        text = path.read_text()
        lines = [line.split(" #", 1)[0] for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                 for line in block.replace("\\\n", " ").splitlines()]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        spans = [span for span in re.findall(r"`([^`]+)`", prose) if "|" not in span]
        for line in lines + spans:
            for part in line.split("&&"):
                part = " ".join(part.split())
                if re.fullmatch(pattern + r".*", part) and len(part.split()) > 2:
                    found.append(part)
    return list(dict.fromkeys(found))


def localize(command: str, places: dict) -> list[str]:
    words = shlex.split(command)[1:]  # without "terrahash"
    out = []
    for i, word in enumerate(words):
        flag = words[i - 1] if i else ""
        if flag == "--config":
            word = places["distill_config" if words[0] == "distill" else "config"]
        elif flag == "--tracking-uri":
            word = places["mlflow"]()
        elif word == "N":
            word = "16" if flag == "--bits" else "1"
        elif word.startswith("runs/"):
            word = str(places["runs"] / word[len("runs/"):])
        out.append(word)
    if out[0] == "summarize":
        return out  # its glob is expanded when it runs, after the evals
    out += ["--data", places["data"], "--cache-dir", places["cache"]]
    if out[0] in ("train", "distill") and "--tracking-uri" not in out:
        out.append("--no-track")
    if out[0] == "train":
        out += [] if "--config" in out else ["--config", places["config"]]
        out += [] if "--out" in out else ["--out", str(places["runs"] / "default")]
    return out


@pytest.fixture
def places(subset, tiny_text_encoder, tmp_path, request):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**tiny_config(tiny_text_encoder, epochs=2), "tracking": {"enabled": True}}))
    students = tmp_path / "students.yaml"
    students.write_text(yaml.safe_dump(TINY_STUDENTS))
    return {"config": str(config), "distill_config": str(students), "data": str(subset), "runs": tmp_path / "runs",
            "cache": str(tmp_path / "cache"), "mlflow": lambda: request.getfixturevalue("mlflow_server")}


def test_readmes_show_the_training_commands():
    shown = commands(TRAINING)
    for needed in ("terrahash train --config", "terrahash distill --teacher", "terrahash eval --model",
                   "terrahash summarize", "terrahash train --workers", "terrahash train --config fast --tracking-uri"):
        assert any(c.startswith(needed) for c in shown), (needed, shown)


def test_every_readme_training_command_runs(local_ray, places, capsys):
    order = ["train", "distill", "eval", "summarize"]
    shown = sorted(commands(TRAINING), key=lambda c: order.index(c.split()[1]))
    runs = {}
    for command in shown:
        runs.setdefault(tuple(localize(command, places)), command)  # the same once localized: once
    for argv, command in runs.items():
        argv = list(argv)
        if argv[0] == "summarize":
            argv = ["summarize", *sorted(p for word in argv[1:] for p in glob.glob(word))]
            assert len(argv) > 1, command
        if argv[0] == "distill" and not (Path(argv[argv.index("--teacher") + 1]) / "checkpoint.pt").exists():
            continue  # a teacher the README names only in passing; the trained ones are distilled
        assert main(argv) == 0, (command, argv, capsys.readouterr())
        out = capsys.readouterr().out
        if argv[0] in ("eval", "summarize"):
            assert "map_all" in out or "mAP" in out, (command, out[-2000:])
    assert (places["runs"] / "fast_split-64" / "students" / "onnx").is_dir()  # the main job's distill ran


@pytest.mark.parametrize("command", commands(r"python -m evaluation\.\w+"))
def test_every_readme_benchmark_explains_itself(command):
    module = command.split()[2]
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
    for flag in re.findall(r"(--[a-z][a-z-]*)", command):
        assert flag in result.stdout, (command, flag)  # the flags the README uses exist
