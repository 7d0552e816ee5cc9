"""Under CI a skip is a failure: a missing dataset, CRD folder or package cannot pass silently there."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIPPING = {
    "test_skips_at_run.py": "import pytest\n\n\ndef test_needs_the_data():\n    pytest.skip('no dataset here')\n",
    "test_skips_at_import.py": "import pytest\n\npytest.importorskip('no_such_package_for_terrahash')\n\n\n"
                               "def test_never_runs():\n    pass\n",
}


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    for name, source in SKIPPING.items():
        (tmp_path / name).write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    # tests/conftest.py as a plugin: its hooks, not its folder, are what is under test.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--continue-on-collection-errors",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_skips_pass_outside_ci(tmp_path):
    done = _run(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 skipped" in done.stdout and "no dataset here" in done.stdout


def test_every_skip_fails_under_ci_and_says_why(tmp_path):
    done = _run(tmp_path, "true")
    assert done.returncode != 0, done.stdout
    assert "skipped under CI=true, which allows no skip: no dataset here" in done.stdout
    assert "skipped under CI=true, which allows no skip: could not import 'no_such_package_for_terrahash'" in done.stdout
    assert "1 failed" in done.stdout and "1 error" in done.stdout, done.stdout
