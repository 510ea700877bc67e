"""Docs build with --strict and every tutorial runs top to bottom (quick mode)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(script, tmp_path):
    # PYTHONPATH: a script's own folder comes first on sys.path, so without it the tutorials
    # would import an installed pbnn instead of this checkout's.
    env = {
        **os.environ,
        "PBNN_QUICK": "1",
        "PBNN_TUTORIAL_OUT": str(tmp_path),
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(p.suffix == ".png" and p.stat().st_size > 5000 for p in tmp_path.iterdir())


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
