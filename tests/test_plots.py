"""tools/plot_metrics.py renders every panel a run's metrics.jsonl feeds (reward, held-out accuracy, KL to the
start policy, loss terms, gradient norm, step time) and tolerates keys a run does not log."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_plot_metrics_renders_a_png(tmp_path):
    rows = [{"step": 0, "eval_greedy": 0.2, "eval_weight_version": "step-0"}]
    for step in range(1, 11):
        rows.append({"step": step, "reward_mean": 0.1 * step, "accuracy": 0.05 * step, "loss": 0.01, "grad_norm": 0.5,
                     "cov_reward_logp": 0.02, "cov_logp_ref": 0.0, "var_logp": 4.0, "time_step_s": 2.0,
                     "time_rollout_s": 1.0, "time_train_s": 0.8, "time_sync_s": 0.1})
    rows[-1].update(eval_greedy=0.4, kl_to_start=0.3)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, str(REPO / "tools/plot_metrics.py"), str(tmp_path)], check=True, cwd=REPO)
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
