"""The examples run end to end (CPU: reference path) and the fine-tuning curves agree without dropout."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_finetune_curves_match_without_dropout():
    out = _run("finetune_classifier.py", "--steps", "3", "--dropout", "0")
    diff = float(re.search(r"max \|difference\| of the loss curves: (\S+)", out).group(1))
    assert diff < 1e-4, out


def test_rtd_pretraining_step_runs():
    out = _run("rtd_pretrain_step.py", "--steps", "2")
    rows = re.findall(r"mlm=(\S+) rtd=(\S+)", out)
    assert len(rows) == 2 and all(float(a) > 0 and float(b) > 0 for a, b in rows), out


# The README's main job (python -m deberta_fast) is tested in tests/test_main_job.py.
