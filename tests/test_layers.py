"""The layers the design promises, read from the code: every import (at module level or inside a
function) goes down a floor or stays on its own, no import closes a cycle, and serving imports no torch.

Floors, bottom to top (a module belongs to the floor of the longest prefix that names it):
storage and the contracts; the model versions and the index; governance; ingest; the Serve runtime;
the lifecycle; the Serve app; the offline edge bundle; the retrieval metrics that training uses; training; the evaluation
report and benchmarks; the CLI, which imports everything and is imported by nothing.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "training", "evaluation", "cluster")
FLOORS = (
    ("storage and contracts", ("serving", "serving.storage", "serving.validation", "serving.model.codes",
                               "serving.model.spec")),
    ("model versions and the index", ("serving.model", "serving.index")),
    ("governance", ("serving.governance",)),
    ("ingest", ("serving.ingest",)),
    ("Serve runtime", ("serving.runtime",)),
    ("lifecycle", ("serving.lifecycle",)),
    ("Serve app", ("serving.app",)),
    ("edge bundle", ("serving.edge",)),  # offline search: the runtime's checks and ranking, none of its Ray
    ("retrieval metrics", ("evaluation", "evaluation.metrics", "evaluation.retrieval", "evaluation.ceiling",
                           "evaluation.corruptions", "evaluation.robustness", "evaluation.model_card")),
    ("training", ("training",)),
    ("evaluation and benchmarks", ("evaluation.",)),
    ("CLI", ("cluster",)),
)
NO_TORCH = ("torch", "torchvision", "timm", "transformers")  # serving runs on `pip install terrahash[serve]`


def project_sources(root: Path = REPO) -> dict[str, tuple[str, str]]:
    """{module name: (path relative to the repo, source)} of every module of the four packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = (str(path.relative_to(root)), path.read_text())
    return out


def imports_of(name: str, path: str, source: str) -> list[tuple[str, int]]:
    """(imported name, line) of every import statement in the source, inside functions too; relative
    imports resolved against the module's package; ``from X import y`` yields X.y (import_graph maps it to
    the module X.y if there is one, else to X)."""
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
            found += [(f"{base.strip('.')}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph(sources: dict[str, tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{module: {project module it imports: first line}}; a name is mapped to the module it names
    (``serving.model.registry.fetch_model`` -> ``serving.model.registry``)."""
    graph: dict[str, dict[str, int]] = {}
    for name, (path, source) in sources.items():
        edges = graph.setdefault(name, {})
        for imported, line in imports_of(name, path, source):
            while imported and imported not in sources:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.setdefault(imported, line)
    return graph


def floor_of(module: str) -> int:
    """The index in FLOORS of the longest prefix naming ``module`` (``"evaluation."`` matches any
    module below evaluation not named by a longer prefix)."""
    best, length = None, -1
    for n, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            matches = (module.startswith(prefix) if prefix.endswith(".")
                       else module == prefix or module.startswith(prefix + "."))
            if matches and len(prefix) > length:
                best, length = n, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")
    return best


def upward_imports(sources: dict[str, tuple[str, str]]) -> list[str]:
    """One line per import that goes up a floor, naming both files and the rule."""
    problems = []
    for importer, edges in import_graph(sources).items():
        for imported, line in edges.items():
            low, high = floor_of(importer), floor_of(imported)
            if high > low:
                problems.append(f"{sources[importer][0]}:{line} imports {sources[imported][0]} ({imported}): "
                                f"floor '{FLOORS[low][0]}' may not import floor '{FLOORS[high][0]}' above it")
    return problems


def cycles(sources: dict[str, tuple[str, str]]) -> list[str]:
    """One line per import cycle (a strongly connected set of modules, Tarjan), naming its files."""
    graph = import_graph(sources)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                files = sorted(sources[m][0] for m in component)
                found.append("import cycle: " + " <-> ".join(files))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def torch_in_serving(sources: dict[str, tuple[str, str]]) -> list[str]:
    return [f"{path}:{line} imports {imported}: serving imports no torch, timm or transformers"
            for name, (path, source) in sources.items() if floor_of(name) <= floor_of("serving.app")
            for imported, line in imports_of(name, path, source) if imported.split(".")[0] in NO_TORCH]


def test_every_import_goes_down_a_floor_or_stays_on_its_own():
    problems = upward_imports(project_sources())
    assert not problems, "\n".join(problems)


def test_no_import_closes_a_cycle():
    problems = cycles(project_sources())
    assert not problems, "\n".join(problems)


def test_serving_imports_no_torch():
    problems = torch_in_serving(project_sources())
    assert not problems, "\n".join(problems)


def test_every_module_is_on_a_floor():
    for name in project_sources():
        floor_of(name)


@pytest.mark.parametrize("importer, source, expected", [
    # an import inside a function, from the bottom floor to the CLI
    ("serving/storage.py", "def f():\n    from cluster.cli.main import main\n",
     "imports cluster/cli/main.py (cluster.cli.main): floor 'storage and contracts' may not import floor 'CLI' above it"),
    # training reaching into the report above it, next to a relative import
    ("training/train.py", "from .config import check\nfrom evaluation import report\n",
     "imports evaluation/report.py (evaluation.report): floor 'training' may not import floor "
     "'evaluation and benchmarks' above it"),
])
def test_an_upward_import_fails_and_names_both_files(importer, source, expected):
    sources = project_sources()
    name = importer[:-3].replace("/", ".")
    sources[name] = (importer, sources[name][1] + "\n" + source)
    problems = upward_imports(sources)
    assert any(p.startswith(importer + ":") and p.split(" ", 1)[1] == expected for p in problems), problems


def test_an_import_that_closes_a_cycle_fails_and_names_the_files():
    sources = project_sources()
    codes = sources["serving.model.codes"]
    # serving.model.spec imports serving.model.codes; the reverse import closes a cycle on one floor
    sources["serving.model.codes"] = (codes[0], codes[1] + "\ndef f():\n    from serving.model import spec\n")
    problems = cycles(sources)
    assert "import cycle: serving/model/codes.py <-> serving/model/spec.py" in problems, problems


def test_torch_in_serving_fails():
    sources = project_sources()
    path, source = sources["serving.runtime.ranking"]
    sources["serving.runtime.ranking"] = (path, source + "\nimport torch\n")
    assert any(p.startswith("serving/runtime/ranking.py:") and "imports torch" in p for p in torch_in_serving(sources))
