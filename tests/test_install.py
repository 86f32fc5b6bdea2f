"""A plain (non-editable) ``pip install .`` gives a working ``edgec`` console script
and the one ``edgec`` namespace (no top-level ``search``/``compile``/``targets``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_console_script_from_a_non_editable_install(tmp_path):
    # --target, not --prefix: pip --prefix uninstalls the running environment's edgec first.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert (site / "edgec" / "search" / "supernet.py").is_file()
    assert {p.name for p in site.iterdir()}.isdisjoint({"search", "compile", "targets"})
    script = site / "bin" / "edgec"
    assert script.is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, str(script), "targets", "--json"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"cpu-ort"' in proc.stdout
    where = subprocess.run([sys.executable, "-c", "import edgec.search.space as m; print(m.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60).stdout
    assert where.startswith(str(site)), where
