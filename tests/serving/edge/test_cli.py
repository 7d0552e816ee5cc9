"""``terrahash-edge`` as a user runs it, and the README's example: a light import, answers, clear refusals."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serving.edge.searcher import EdgeSearcher

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("ray", "torch", "faiss", "fastapi", "starlette", "pydantic", "mlflow", "transformers", "boto3")


def edge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.edge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_importing_the_edge_searcher_imports_nothing_heavy():
    code = ("import sys, json; import serving.edge.cli, serving.edge.http, serving.edge.searcher; "
            f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == []


def test_a_query_from_the_command_line(bundles):
    done = edge(str(bundles["int8"]), "--query", "a river through fields", "--k", "4", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["results"] == EdgeSearcher(bundles["int8"]).search_text({"query": "a river through fields",
                                                                            "k": 4})["results"]
    table = edge(str(bundles["int8"]), "--query", "a river through fields", "--k", "4")
    assert table.returncode == 0 and answer["results"][0]["id"] in table.stdout and "4 results in" in table.stdout
    piped = subprocess.run(f"{sys.executable} -m serving.edge {bundles['int8']} --query fields --json | head -c 11",
                           shell=True, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert piped.stdout == '{\n  "k": 10' and "Traceback" not in piped.stderr, piped.stderr  # a closed pipe is no error
    info = json.loads(edge(str(bundles["int8"]), "--info").stdout)
    assert info["encoders"] == {"text": "dynamic int8", "image": info["encoders"]["image"]} and info["thumbnails"]


def test_bad_input_is_one_clear_line(bundles, tmp_path):
    refused = edge(str(bundles["int8"]), "--query", "x", "--k", "1000")
    assert refused.returncode == 2 and "k must be from 1 to 100" in refused.stderr and "Traceback" not in refused.stderr
    cut = tmp_path / "cut.thb"
    cut.write_bytes(bundles["int8"].read_bytes()[:-5000])
    refused = edge(str(cut), "--query", "x")
    assert refused.returncode == 2 and "not a readable bundle" in refused.stderr, refused.stderr
    no_image = edge(str(bundles["fp32"].with_name("missing.thb")), "--info")
    assert no_image.returncode == 2 and "no such bundle file" in no_image.stderr


def _readme_commands() -> list[str]:
    text = (REPO / "serving" / "edge" / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readmes_edge_example_runs(built_index, tmp_path):
    """Every line of serving/edge/README.md's example, with this run's index and a free port."""
    commands = _readme_commands()
    assert [c.split()[0] for c in commands] == ["terrahash", "terrahash-edge", "terrahash-edge"]
    bin_dir = Path(sys.executable).parent
    bundle = tmp_path / "ucm.thb"
    for command in commands:
        words = command.replace("runs/fast_split-64/index", str(built_index["root"])).replace(
            "ucm.thb", str(bundle)).replace("--port 8000", "--port 0").split()
        words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', " ".join(words))]
        executable = str(bin_dir / words[0])
        if "--serve" not in words:
            done = subprocess.run([executable, *words[1:]], capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert done.returncode == 0, (command, done.stderr[-2000:])
            continue
        server = subprocess.Popen([executable, *words[1:]], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        try:
            line = server.stdout.readline()
            url = re.search(r"http://\S+", line).group(0)
            request = urllib.request.Request(f"{url}/v1/search/text", data=b'{"query": "fields", "k": 2}',
                                             headers={"Content-Type": "application/json"})
            deadline = time.monotonic() + 30
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200 and len(json.loads(answer.read())["results"]) == 2
            assert time.monotonic() < deadline
        finally:
            server.terminate()
            server.wait(timeout=30)
