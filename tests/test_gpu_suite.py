"""experiments/gpu_suite.py in its CPU mode (tiny shapes), so the one-call accelerator suite cannot rot
between the sessions that are lent a GPU (issue 21)."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "gpu_suite.py"


def test_gpu_suite_cpu_mode_writes_consistent_tables(script_env, tmp_path):
    out = tmp_path / "suite"
    run = subprocess.run([sys.executable, str(SCRIPT), "--mode", "cpu", "--out", str(out), "--repeats", "1"],
                         env=script_env(1), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "suite.json").read_text())
    assert result["mode"] == "cpu" and result["peak_tflop_s"] > 0
    [gen] = result["gen"]
    assert gen["batch"] == 2 and gen["ours_tok_s"] > 0 and gen["transformers_tok_s"] > 0
    assert math.isclose(gen["speedup"], gen["ours_tok_s"] / gen["transformers_tok_s"], rel_tol=1e-9)
    assert [r["algorithm"] for r in result["rl"]] == ["ppo", "grpo"]
    for row in result["rl"]:
        assert row["rollout_s"] > 0 and row["update_s"] > 0 and 0 < row["update_mfu"] < 1
        assert row["seq_len"] == 16 and row["batch"] == 8
    assert 0 < result["sft"]["mfu"] < 1
    table = (out / "suite.md").read_text()
    assert "| tiny | 2 |" in table and "| ppo | tiny | 8 | 16 |" in table and "| grpo | tiny | 8 | 16 |" in table
