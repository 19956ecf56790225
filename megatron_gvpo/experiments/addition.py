"""The main job: online GVPO on the addition task with the real SGLang server, from nothing but this repository.

    .venv/bin/python -m megatron_gvpo.experiments.addition [--config configs/addition_gvpo.yaml] [--set ...]

1. assets: the task's tokenizer and train / held-out prompts (`data.addition.make_tiny_assets`), if missing;
2. warm start: a short supervised run of the tiny model that stops at ~15% held-out accuracy
   (`experiments.warm_start`), if missing, so that groups have rewards that differ;
3. GVPO: `megatron_gvpo.train` with `rollout.source: online`: SGLang samples groups, the exact-match reward
   scores them, Megatron trains, weights go back to SGLang, held-out accuracy is measured through SGLang;
4. prints held-out greedy accuracy before and after, and writes <run.dir>/curves.png.

Rerunning resumes the run from its newest checkpoint (and reprints the summary once it is complete).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_gvpo.config import Config, add_config_arguments, load_config
from megatron_gvpo.utils.cli import run_main, user_errors


def prepare(cfg: Config, log=print) -> None:
    """Assets and warm start for cfg (what is missing only)."""
    from megatron_gvpo.data.addition import make_tiny_assets
    from megatron_gvpo.experiments.warm_start import WarmStartConfig, warm_start

    assets = Path(cfg.prompts.path).parent
    for line in make_tiny_assets(assets):
        log(line)
    model = Path(cfg.model.path)
    if not (model / "warm_start.json").is_file():
        log(f"warm start into {model} (supervised, stops at held-out greedy accuracy 15%)")
        summary = warm_start(model, WarmStartConfig(tokenizer=str(assets / "tokenizer"),
                                                    heldout_prompts=str(assets / "heldout_prompts.jsonl")), log=log)
        if not summary["reached_target"]:
            raise RuntimeError(f"the warm start stopped at {summary['heldout_greedy']:.1%} held-out accuracy "
                               f"after {summary['steps']} steps, short of its target")
    else:
        log(f"kept    {model} (warm start exists)")


def summary(run_dir: Path) -> str:
    from megatron_gvpo.utils.plots import read_metrics

    evals = [r for r in read_metrics(run_dir) if "eval_greedy" in r]
    if len(evals) < 2:
        return "not enough evaluations for a before/after summary"
    first, last = evals[0], evals[-1]
    lines = [f"held-out greedy accuracy: {first['eval_greedy']:.1%} (step {first['step']}) -> "
             f"{last['eval_greedy']:.1%} (step {last['step']}, weights {last.get('eval_weight_version')})"]
    passk = [k for k in last if k.startswith("eval_pass@")]
    lines += [f"held-out {k.removeprefix('eval_')}: {first[k]:.1%} -> {last[k]:.1%}" for k in passk if k in first]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from megatron_gvpo.train import train
    from megatron_gvpo.utils.plots import plot_metrics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, default_config="configs/addition_gvpo.yaml")
    args = parser.parse_args(argv)
    with user_errors():
        cfg = load_config(Config, args.config, args.overrides)
    start = time.perf_counter()
    prepare(cfg)
    train(cfg)
    run_dir = Path(cfg.run.dir)
    text = summary(run_dir)
    png = plot_metrics(run_dir)
    print(f"\n{text}\ncurves: {png}\ntotal {time.perf_counter() - start:.0f} s")
    (run_dir / "summary.json").write_text(json.dumps({"summary": text, "seconds": time.perf_counter() - start}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("megatron_gvpo.experiments.addition", main))
