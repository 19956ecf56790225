"""Training curves from a run's metrics.jsonl, as one PNG: reward, held-out accuracy, loss terms, KL to the
start policy, gradient norm, step time.

    .venv/bin/python tools/plot_metrics.py runs/addition_gvpo    # writes runs/addition_gvpo/curves.png
"""

from __future__ import annotations

import json
from pathlib import Path

TIME_PARTS = (("time_rollout_s", "rollout"), ("time_reward_s", "reward"), ("time_logprob_s", "log-probs"),
              ("time_train_s", "train"), ("time_sync_s", "weight sync"), ("time_eval_s", "evaluation"))


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the curves of run_dir/metrics.jsonl to `out` (default run_dir/curves.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    ax = axes[0][0]
    ax.plot(*_series(records, "reward_mean"), label="train reward (mean)")
    ax.plot(*_series(records, "accuracy"), label="train accuracy", alpha=0.6)
    ax.set_title("rollout reward")
    ax = axes[0][1]
    for key in sorted({k for r in records for k in r if k.startswith("eval_") and k != "eval_weight_version"}):
        ax.plot(*_series(records, key), marker="o", label=key.removeprefix("eval_"))
    ax.set_title("held-out accuracy")
    ax.set_ylim(0, 1)
    ax = axes[0][2]
    ax.plot(*_series(records, "kl_to_start"), marker="o", label="KL(pi_start || pi)")
    ax.set_title("KL to the start policy [nats per response]")
    ax = axes[1][0]
    for key in ("loss", "cov_reward_logp"):
        ax.plot(*_series(records, key), label=key, alpha=0.8)
    twin = ax.twinx()  # the log-prob (co)variances are ~100x the loss
    for key, color in (("cov_logp_ref", "tab:green"), ("var_logp", "tab:red")):
        twin.plot(*_series(records, key), label=f"{key} (right axis)", color=color, alpha=0.5)
    if twin.get_legend_handles_labels()[0]:
        twin.legend(fontsize=8, loc="lower right")
    ax.set_title("loss and its terms (paper Eq. 17)")
    ax = axes[1][1]
    ax.plot(*_series(records, "grad_norm"), label="grad norm", alpha=0.8)
    ax.set_yscale("log" if _series(records, "grad_norm")[1] else "linear")
    ax.set_title("gradient norm")
    ax = axes[1][2]
    steps = [r["step"] for r in records if "time_step_s" in r]
    bottom = [0.0] * len(steps)
    for key, label in TIME_PARTS:
        values = [r.get(key, 0.0) for r in records if "time_step_s" in r]
        if any(values):
            ax.bar(steps, values, bottom=bottom, label=label, width=1.0)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_title("step time breakdown [s]")
    for ax in (a for row in axes for a in row):
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
