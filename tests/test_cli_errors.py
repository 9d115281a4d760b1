"""A user's mistakes on the command line end with one line that names the file or the key, never a
traceback: a config path that does not exist, a weights path that does not exist, a mistyped key (with
the closest valid one)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--cfg", "configs/nope.yaml"], "error: config file configs/nope.yaml: No such file or directory"),
    ("eval.py", ["--cfg", "configs/nope.yaml", "--weights", "w.pth"],
     "error: config file configs/nope.yaml: No such file or directory"),
    ("eval.py", ["--cfg", "configs/quickstart.yaml", "--weights", "missing.pth"], "error: missing.pth: no such file"),
    ("demo.py", ["datasets", "--cfg", "configs/quickstart.yaml", "--weights", "missing.pth"],
     "error: missing.pth: no such file"),
    ("train.py", ["--cfg", "configs/quickstart.yaml", "solver.base_lrr=0.1"],
     "error: unknown config key 'solver.base_lrr'; did you mean 'solver.base_lr'?"),
    ("eval.py", ["--cfg", "configs/quickstart.yaml", "--weights", "w.pth", "model.backbone.dpeth=50"],
     "error: unknown config key 'model.backbone.dpeth' (model.arch 'scnet' has no such option); "
     "did you mean 'model.backbone.depth'?"),
])
def test_one_line_errors(script, args, message, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and proc.stderr.strip() == message, proc.stderr[-2000:]
