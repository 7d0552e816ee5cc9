"""The `terrahash index ...` and `terrahash serve ...` commands as README.md, docs/serving.md and serving/README.md
write them, run on tiny data (only paths, a free port and --exit for serve, --no-track for index jobs are changed)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cluster.cli.main import main  # noqa: E402
from tests.conftest import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SOURCES = [REPO / "README.md", REPO / "docs" / "serving.md", REPO / "serving" / "README.md"]


def readme_commands(path: Path) -> list[str]:
    """Every `terrahash index|serve` command of a Markdown file: lines of its bash blocks (with their
    continuations, comments cut) and inline code spans (optional [...] parts left out)."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if re.match(r"terrahash (index|serve)\b", line) and not _arms(line):
                commands.append(" ".join(line.split()))
    for span in re.findall(r"`(terrahash (?:index|serve)\b[^`]*)`", text):
        words = re.sub(r"\[[^\]]*\]", "", span).split()
        if "|" not in span and len(words) > (3 if words[1] == "index" else 2) and not _arms(span):  # a command
            commands.append(" ".join(words))
    return commands


def _arms(command: str) -> bool:
    """``serve --config FILE`` (traffic arms) and ``--render``: run by tests/serving/runtime/test_traffic.py and
    tests/serving/test_app.py (the shipped Serve config), not here."""
    return "--config" in command or "--render" in command


def new_imagery(folder: Path, n: int = 3) -> Path:
    """A dataset of new images (random JPEGs with captions) for `index add`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"added{i}.jpg")
        entries.append({"filename": f"added{i}.jpg", "filepath": "images", "split": "test", "class": "added",
                        "sentences": [{"raw": f"a newly added scene {i}"}]})
    (folder / "dataset_added.json").write_text(json.dumps({"dataset": "added", "images": entries}))
    return folder


def stac_catalog(images: Path, out: Path) -> Path:
    """A static STAC catalog of ``images``' JPEGs, each inside the README's bbox and interval (its serve
    --bbox --datetime example must find them)."""
    from datetime import datetime, timezone

    import pystac

    catalog = pystac.Catalog("field", "images of a field survey")
    for n, path in enumerate(sorted(images.glob("*.jpg"))):
        west, south = -117.15 + 0.01 * n, 33.95
        box = [west, south, west + 0.005, south + 0.005]
        item = pystac.Item(f"field-{n}", {"type": "Polygon", "coordinates": [[[box[0], box[1]], [box[2], box[1]],
                           [box[2], box[3]], [box[0], box[3]], [box[0], box[1]]]]}, box,
                           datetime(2024, 7, 1, tzinfo=timezone.utc), {})
        item.add_asset("visual", pystac.Asset(str(path.resolve()), media_type="image/jpeg", roles=["visual"]))
        catalog.add_item(item)
    catalog.normalize_and_save(str(out), pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


def localize(command: str, places: dict) -> list[str]:
    """The README command with its paths and placeholders replaced by this test's. A --stac build writes,
    and a place or time search reads, an index of its own (places["geo_root"])."""
    words = shlex.split(command)[1:]  # without "terrahash"
    geo = "--stac" in words or "--bbox" in words or "--datetime" in words
    out = []
    for i, word in enumerate(words):
        flag = words[i - 1] if i else ""
        if flag == "--model":
            word = places["model"]
        elif flag == "--data":
            word = places["added" if words[:2] == ["index", "add"] else "data"]
        elif flag == "--images" and words[:2] in (["index", "build"], ["index", "add"]):
            word = places["images"]
        elif flag == "--stac":
            word = places["stac"]
        elif flag in ("--out", "--index") and geo:
            word = places["geo_root"]
        elif flag in ("--out", "--index") or (flag in ("verify", "release") and words[0] == "index"):
            word = places["root"]
        elif word == "FILE" and words[:2] == ["index", "keygen"]:
            word = places["key"]  # outside the index root, as a build requires
        elif flag == "--shards" and word == "N":
            word = "3"
        out.append(word)
    if out[:2] in (["index", "build"], ["index", "add"]):
        out.append("--no-track")  # tracking has its own test (tests/serving/ingest/test_build.py)
        if out[:2] == ["index", "build"] and not {"--data", "--images", "--stac"} & set(out):
            out += ["--data", places["data"]]  # the README's default is the full dataset
    if out[0] == "serve":
        out += ["--exit", "--port", str(places["port"])]
    return out


@pytest.fixture
def places(model_dir, subset, tmp_path):
    images = new_imagery(tmp_path / "folder") / "images"  # a plain folder of images, no JSON
    return {"model": str(model_dir), "data": str(subset), "added": str(new_imagery(tmp_path / "added")),
            "images": str(images), "stac": str(stac_catalog(images, tmp_path / "catalog")),
            "root": str(tmp_path / "index-root"), "geo_root": str(tmp_path / "geo-root"),
            "key": str(tmp_path / "index.key"), "port": free_port()}


def test_readmes_show_the_index_and_serve_commands():
    commands = [c for path in SOURCES for c in readme_commands(path)]
    for needed in ("terrahash index build", "terrahash index add", "terrahash index verify", "terrahash index release",
                   "terrahash serve --index"):
        assert any(c.startswith(needed) for c in commands), (needed, commands)
    assert any(c.startswith("terrahash index build") and "--images" in c for c in commands)  # a plain folder
    assert any(c.startswith("terrahash index build") and "--stac" in c for c in commands)  # a STAC catalog
    assert any(c.startswith("terrahash serve") and "--bbox" in c for c in commands)  # a search by place
    assert any(c.startswith("terrahash serve") and "--data" not in c for c in commands)


def test_every_readme_index_and_serve_command_runs(local_ray, places, capsys):
    commands = [c for path in SOURCES for c in readme_commands(path)]
    order = ["index keygen", "index build", "index add", "index release", "index verify", "serve"]
    commands = sorted(commands, key=lambda c: next(i for i, o in enumerate(order) if o in c))
    runs = list(dict.fromkeys(tuple(localize(c, places)) for c in commands))  # the same once localized: once
    for argv in map(list, runs):
        assert main(argv) == 0, (argv, capsys.readouterr())
        out = capsys.readouterr().out
        if argv[:2] in (["index", "build"], ["index", "add"], ["index", "release"]):
            assert re.search(r"release r\d{4} in ", out), out
        if argv[:2] == ["index", "verify"]:
            assert "all good" in out, out
        if argv[0] == "serve" and "--query" in argv and "--bbox" in argv:
            assert "query: " in out and "  1. field-" in out and "2024-07-01" in out, out  # found by place and time
        elif argv[0] == "serve" and "--query" in argv:
            assert "query: " in out and "  1. " in out and "classes: " in out, out  # classes without --data
    assert {tuple(a[:2]) for a in runs} >= {("index", "build"), ("index", "add"), ("index", "verify"),
                                            ("index", "release"), ("serve", "--index")}
    assert any(a[0] == "serve" and "--query" in a and "--data" not in a for a in runs)
