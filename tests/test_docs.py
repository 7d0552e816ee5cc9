"""Docs that cannot rot: every package README names exactly the package's modules, every `terrahash ...` command
of every README and docs page parses with the CLI's own parser, and the top README stays short and opens with the
two commands a newcomer runs (the main job, and the test command CI runs). Parsing only: tests/cluster/test_readme_*.py
run the commands."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from cluster.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "training", "evaluation", "serving")
FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)
SHELL = {"bash", "sh", "shell", "console"}
COMMAND = re.compile(r"(?:^|(?<=[\s(]))(?:\.venv/bin/)?terrahash(?=\s|$)")
PLACEHOLDER_NUMBERS = {"N": "2", "K": "2", "BITS": "64"}  # placeholders of options that take numbers


def doc_files() -> list[Path]:
    """The top README, every README inside the packages, and every page under docs/."""
    packages = sorted(p for top in PACKAGES for p in (REPO / top).rglob("README.md"))
    return [REPO / "README.md", *packages, *sorted((REPO / "docs").glob("*.md"))]


def package_dirs() -> list[Path]:
    return sorted(init.parent for top in PACKAGES for init in (REPO / top).rglob("__init__.py"))


# --- module tables ---


def module_table_names(readme: Path) -> list[str]:
    """The names in the first column of every table whose first header cell is "module" (backticked; a row may
    name several, as "`a.py`, `b.py`")."""
    names, in_table = [], False
    lines = readme.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            in_table = False
            continue
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        if i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):  # a header row
            in_table = cells[0].strip().lower() == "module"
            continue
        if in_table and not re.match(r"^\|[\s:|-]+\|$", line):
            names += re.findall(r"`([^`]+)`", cells[0])
    return names


@pytest.mark.parametrize("package", package_dirs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_package_readme_lists_exactly_its_modules(package):
    readme = package / "README.md"
    assert readme.is_file(), f"{package.relative_to(REPO)} has no README.md naming its modules"
    names = module_table_names(readme)
    assert names, f"{readme.relative_to(REPO)} has no table whose first column is 'module'"
    missing_files = [n for n in names if not (package / n.rstrip("/")).exists()]
    assert not missing_files, f"{readme.relative_to(REPO)} names what does not exist: {missing_files}"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    listed = {n for n in names if n.endswith(".py") or n in modules}
    assert not modules - listed, f"{readme.relative_to(REPO)} lacks a row for {sorted(modules - listed)}"
    assert not listed - modules, f"{readme.relative_to(REPO)} lists {sorted(listed - modules)}, not modules of it"


def test_module_tables_are_read_as_written(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("| module | what |\n|---|---|\n| `a.py`, `b.py` | x \\| y |\n| [`sub/`](sub/README.md) | z |\n\n"
                      "| file | what |\n|---|---|\n| `other.py` | not a module table |\n")
    assert module_table_names(readme) == ["a.py", "b.py", "sub/"]


# --- commands ---


def shell_lines(text: str) -> list[str]:
    """The lines of the shell blocks (continuations joined, comments and prompts cut)."""
    lines = []
    for language, block in FENCE.findall(text):
        if language in SHELL:
            for line in block.replace("\\\n", " ").splitlines():
                lines.append(line.split(" #", 1)[0].strip().removeprefix("$ "))
    return lines


def commands_in(text: str) -> list[tuple[str, bool]]:
    """Every `terrahash ...` command of a Markdown text, with whether it is in a shell block (where it must be
    complete). Inline code spans showing alternatives ("status|set") or a placeholder command (<command>) are
    left out; "a && b" is two commands."""
    found = []
    prose = FENCE.sub("", text)
    spans = [s for s in re.findall(r"`([^`]+)`", prose) if "|" not in s and "<" not in s]
    for line, in_block in [(line, True) for line in shell_lines(text)] + [(s, False) for s in spans]:
        for part in _parts(line):
            match = COMMAND.search(part)
            if match:
                command = part[match.start():].strip()
                if "$(" in part[:match.start()]:
                    command = command.removesuffix(")")
                found.append((" ".join(command.split()), in_block))
    return found


def _parts(line: str) -> list[str]:
    """``line`` cut at the shell's separators (&&, ||, ;, a pipe) outside quotes."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif line.startswith(("&&", "||"), i) or char in ";|":
            parts.append(current)
            current, i = "", i + (2 if line.startswith(("&&", "||"), i) else 1)
            continue
        current += char
        i += 1
    return [*parts, current]


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of the deepest subcommand ``words`` name."""
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


def check_command(command: str, in_block: bool) -> list[str]:
    """What is wrong with ``command`` for the CLI's parser (empty when nothing). Optional "[...]" parts are
    checked as if given; "..." elides arguments, so only the options named are checked. Prose may name a
    command with a few of its options and without its required ones; a shell block's command is complete."""
    words = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", command))[1:]  # without "terrahash"
    words = [PLACEHOLDER_NUMBERS.get(w, "x" if w.startswith("$") else w) for w in words]
    inner = []
    if "--" in words:
        words, inner = words[:words.index("--")], words[words.index("--") + 1:]
    parser = build_parser()
    sub = _subparser(parser, words)
    problems = [f"unknown option {w.split('=')[0]} of '{sub.prog}'" for w in words
                if w.startswith("--") and w.split("=")[0] not in sub._option_string_actions]
    if "..." not in words and not problems:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(words + (["--", *inner] if inner else []))
        except SystemExit as exit_:
            if exit_.code != 0 and not (not in_block and "arguments are required" in err.getvalue()):
                problems.append(err.getvalue().strip().splitlines()[-1])
    if inner and words[:1] == ["submit"] and "--module" not in words and not inner[0].isupper():
        problems += check_command("terrahash " + shlex.join(inner), in_block)  # the subcommand the job runs
    return problems


def test_every_documented_command_parses():
    checked, wrong = 0, []
    for path in doc_files():
        for command, in_block in commands_in(path.read_text()):
            checked += 1
            wrong += [f"{path.relative_to(REPO)}: {command}\n    {p}" for p in check_command(command, in_block)]
    assert checked > 100, checked  # the docs show many; finding few means the extraction broke
    assert not wrong, "\n".join(wrong)


def test_the_command_check_finds_mistakes():
    assert check_command("terrahash index build --model m --shards 2 --out o", True) == []
    assert check_command("terrahash serve --index x --query 'a b' --bbox -1 -1 1 1", True) == []
    assert check_command("terrahash index build", False) == []  # a command's name in prose
    assert check_command("terrahash train --workers N", False) == []  # an option of it
    assert check_command("terrahash train --workers many", False)  # a value of the wrong type
    assert check_command("terrahash index build", True)  # in a shell block it must be complete
    assert check_command("terrahash index build --model m --shards 2 --out o --shard 3", True)  # no such option
    assert check_command("terrahash report ... --peer FILE", False)  # elided, but the option is misspelt
    assert check_command("terrahash promte terrahash-students 3 --alias champion", True)  # no such command
    assert check_command("terrahash submit --no-follow -- train --config c --bits N --out o", True) == []
    assert check_command("terrahash submit --no-follow -- train --bitz 64", True)  # the job's command is checked
    assert commands_in("```bash\nID=$(terrahash jobs list)\npip install terrahash[serve]\n```\n`terrahash a|b`") == [
        ("terrahash jobs list", True)]
    assert _parts("terrahash x --reason 'a; b' && terrahash y | head") == ["terrahash x --reason 'a; b' ", " terrahash y ", " head"]


# --- the top README ---


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.split()) < 2000, len(text.split())
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    setup = "bash cluster/setup.sh"
    tests = next(line for line in ci if line.startswith(".venv/bin/python -m pytest"))
    assert setup in ci
    opening = shell_lines("\n".join(text.splitlines()[:30]) + "\n```")
    assert "bash cluster/demo.sh" in opening, opening  # the main job, as it is run
    assert f"{setup} && {tests}" in opening, (tests, opening)  # the test command, exactly as CI runs it
