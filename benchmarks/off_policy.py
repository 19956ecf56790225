"""Off-policy data: GVPO trained only on a fixed dataset sampled once from another policy vs on-policy GVPO, on
the main job's task; and on the tabular problem, the distance to pi* from each sampling distribution.

What it measures. The fixed datasets are drawn once, before any training, by the shared SGLang server from
the benchmarks' start policy (`benchmarks/_rl.py`), 8 samples for each of the task's 512 training prompts
(a run trains on 480 of these groups, in its seed's order), scored by the task's exact-match reward:
- `start`: the start policy at temperature 1 (what an online run's first step sees, but never refreshed);
- `hot`: the start policy at temperature HOT (a broader, worse sampler);
- `mixture`: per prompt, 4 samples of each.
Each dataset trains for STEPS steps (`rollout.source: offline`: 16 groups per step, 2 optimizer steps):
- GVPO with pi_ref the start policy (`algo.reference: frozen`): the setting of the paper's Theorem 3.1, whose
  optimum pi_start * exp(R / beta) / Z does not depend on the sampling distribution;
- GVPO with pi_ref the policy at the start of each step (`old_policy`, the paper's Algorithm 1 and the main
  job's setting): a moving reference, so the theorem's fixed optimum does not apply across steps;
- GRPO (its PPO ratio against the policy at the start of each step: without behaviour log-probs it is
  biased off-policy), for contrast.
All are evaluated through the same server as the online runs (`rollout.eval_offline`); the same three trained
online (on-policy) draw as many samples while training.
Reported over SEEDS (the order of the groups, or the online samples): held-out greedy accuracy at the end,
and KL(pi_start || pi_final) estimated on a fixed probe of 512 `start` samples (samples of pi_start:
mean of log pi_start(y|x) - log pi_final(y|x), sequence log-probs computed by transformers from the run's
exported final checkpoint), the same probe for every run.

Tabular part: `megatron_gvpo.experiments.tabular` (configs/tabular_optimum.yaml) with the samplers on-policy,
reference, tempered (pi_ref at T=1.5), their mixture and uniform, GVPO and GRPO, 3 seeds: KL(pi || pi*)
after 1500 Adam steps, where pi* is the paper's closed-form optimum.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/off_policy.py     # 9 min on 2 cores

Writes benchmarks/results/off_policy/{table.md, off_policy.png, runs.jsonl, tabular/}; a rerun keeps the runs
in runs.jsonl (--fresh: start over).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import _rl
from _common import REPO_ROOT, RESULTS, publish

OUT = RESULTS / "off_policy"
RUNS = REPO_ROOT / "runs/benchmarks/off_policy"
STEPS, LR, HOT, SEEDS = 30, 2e-4, 1.5, (1, 2)
SOURCES = ("online", "start", "hot", "mixture")
METHODS = {"gvpo_frozen": ["algo.name=gvpo", "algo.reference=frozen"],
           "gvpo_old": ["algo.name=gvpo", "algo.reference=old_policy"],
           "grpo": ["algo.name=grpo", "algo.reference=old_policy"]}
METHOD_LABELS = {"gvpo_frozen": "GVPO, pi_ref = start", "gvpo_old": "GVPO, pi_ref = pi_old", "grpo": "GRPO"}
PROBE_GROUPS = 64
LABELS = {"online": "on-policy (online)", "start": "fixed: start policy, T=1", "hot": f"fixed: start policy, T={HOT}",
          "mixture": f"fixed: mixture of T=1 and T={HOT}"}


def common(start: Path, method: str, seed: int) -> list[str]:
    return [f"model.path={start}", *METHODS[method], f"train.lr={LR}", f"run.seed={seed}",
            f"train.steps={STEPS}", "train.global_batch_size=64", "rollout.eval_interval=10", "run.save_interval=0"]


def make_datasets(url: str, paths: dict[str, Path]) -> None:
    """The fixed datasets (module docstring) into `paths` unless they exist, from the server's current weights,
    the start policy: call before any run changes them. Rows in the ids form of megatron_gvpo/data/offline.py,
    exactly the token ids an online run would train on."""
    from megatron_gvpo.data.prompts import load_prompts
    from megatron_gvpo.rewards import score
    from megatron_gvpo.rollout.base import SamplingParams
    from megatron_gvpo.rollout.client import SGLangClient
    from megatron_gvpo.train import load_tokenizer
    from megatron_gvpo.utils.files import write_text_atomically

    if all(p.is_file() for p in paths.values()):
        return
    cfg = _rl.base_config([])
    tokenizer = load_tokenizer(cfg)
    prompts, _ = load_prompts(cfg.prompts.path, cfg.prompts, tokenizer)
    client = SGLangClient([url], timeout_s=cfg.rollout.request_timeout_s)
    k, max_new = cfg.algo.group_size, cfg.rollout.max_new_tokens
    samples = {}
    for name, temperature, seed in (("start", 1.0, 101), ("hot", HOT, 202)):
        groups = client.generate([list(p.ids) for p in prompts],
                                 SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new, seed=seed))
        flat = [(p, x) for p, g in zip(prompts, groups, strict=True) for x in g]
        rewards = score([p.text for p, _ in flat],
                        [tokenizer.decode(x.token_ids, skip_special_tokens=False) for _, x in flat],
                        [p.label for p, _ in flat], [i // k for i in range(len(flat))], cfg.reward).rewards
        samples[name] = [[(list(x.token_ids), rewards[i * k + j]) for j, x in enumerate(g)]
                         for i, g in enumerate(groups)]
    samples["mixture"] = [a[: k // 2] + b[: k - k // 2] for a, b in zip(samples["start"], samples["hot"], strict=True)]
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt_ids": list(p.ids), "responses": [{"ids": ids, "reward": r} for ids, r in group]}
                for p, group in zip(prompts, samples[name], strict=True)]
        write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def dataset_reward(path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return statistics.fmean(r["reward"] for row in rows for r in row["responses"])


class KLProbe:
    """KL(pi_start || pi) on fixed samples of pi_start: mean over them of log pi_start(y|x) - log pi(y|x)."""

    def __init__(self, start: Path, data: Path):
        rows = [json.loads(line) for line in data.read_text().splitlines()][:PROBE_GROUPS]
        self.pairs = [(row["prompt_ids"], r["ids"]) for row in rows for r in row["responses"]]
        self.start_logp = self._logprobs(start)

    def _logprobs(self, model_dir: Path):
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        width = max(len(p) + len(r) for p, r in self.pairs)
        tokens = torch.zeros(len(self.pairs), width, dtype=torch.long)
        scored = torch.zeros(len(self.pairs), width, dtype=torch.bool)
        for i, (p, r) in enumerate(self.pairs):
            tokens[i, : len(p) + len(r)] = torch.tensor(p + r)
            scored[i, len(p) - 1: len(p) + len(r) - 1] = True  # position t predicts token t+1
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).logits.float(), -1)[:, :-1]
        token_logp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return (token_logp * scored[:, :-1]).sum(1)

    def kl(self, run_dir: Path) -> float:
        import tempfile

        from megatron_gvpo.megatron.checkpoint import latest_checkpoint
        from megatron_gvpo.megatron.convert.to_hf import export_hf

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(latest_checkpoint(run_dir / "checkpoints"), Path(tmp) / "hf", progress=False)
            return float((self.start_logp - self._logprobs(Path(tmp) / "hf")).mean())


def tabular(out: Path) -> str:
    from megatron_gvpo.config import load_config
    from megatron_gvpo.experiments import tabular as tab

    cfg = load_config(tab.TabularConfig, REPO_ROOT / "configs/tabular_optimum.yaml",
                      [f"run.dir={out}", "methods=[gvpo, grpo]"])
    out.mkdir(parents=True, exist_ok=True)
    records = tab.run_experiment(cfg, log=lambda *_: None)
    table = tab.summary_table(cfg, records)
    (out / "table.md").write_text(table + "\n")
    tab.plot_curves(cfg, records, out / "curves.png")
    return table


def report(runs: list[dict], rewards: dict[str, float], tabular_table: str) -> str:
    lines = [
        "# Off-policy data: GVPO on fixed datasets from other policies vs on-policy",
        "",
        _rl.provenance("off_policy.py", runs) + f" lr {LR:g}; {STEPS} steps of 16 groups of 8. Fixed datasets (drawn "
        "once from the start policy): mean reward "
        + ", ".join(f"{name} {value:.1%}" for name, value in rewards.items()) + ".",
        "",
        "Mean ± std over seeds: final held-out greedy accuracy (through SGLang) and KL(pi_start || pi_final) on "
        f"{PROBE_GROUPS * 8} fixed samples of the start policy.",
        "",
    ]
    cells = {(s, m): [r for r in runs if r["source"] == s and r["method"] == m] for s in SOURCES for m in METHODS}
    lines += _rl.markdown_table(
        ["training data", "method", "final accuracy", "change", "KL to start"],
        ([LABELS[s], METHOD_LABELS[m], _rl.mean_std(r["final_greedy"] for r in rs),
          _rl.mean_std(r["final_greedy"] - r["start_greedy"] for r in rs),
          _rl.mean_std((r["kl_probe"] for r in rs), pct=False)]
         for (s, m), rs in cells.items() if rs))
    lines += ["", "![held-out accuracy during training](off_policy.png)", "",
              "## Tabular problem: distance to the closed-form optimum from each sampling distribution", "",
              tabular_table, "", "![KL to pi* during training](tabular/curves.png)", ""]
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    fig, axes = _rl.subplots(len(METHODS), 16)
    for ax, method in zip(axes, METHODS, strict=True):
        for source in SOURCES:
            rs = [r for r in runs if r["source"] == source and r["method"] == method]
            if not rs:
                continue
            steps = [s for s, _ in rs[0]["curve"]]
            mean = [statistics.fmean(dict(r["curve"])[s] for r in rs) for s in steps]
            ax.plot(steps, mean, marker="o", label=LABELS[source])
        ax.set_title(f"{METHOD_LABELS[method]}: held-out greedy accuracy (mean over seeds)", fontsize=10)
        ax.set_ylim(0, 1)
    _rl.save_figure(fig, axes, out, "step")


def main() -> None:
    args = _rl.sweep_parser(__doc__.split("\n\n")[0], OUT, SEEDS).parse_args()
    log = _rl.RunLog(args.out / "runs.jsonl", fresh=args.fresh)
    t0 = time.perf_counter()
    start = _rl.bench_start()
    data = {name: RUNS / "data" / f"{name}.jsonl" for name in SOURCES[1:]}
    todo = [(s, m, seed) for seed in args.seeds for s in SOURCES for m in METHODS if f"{s}_{m}_seed{seed}" not in log]
    with _rl.shared_server(RUNS / "logs", [f"model.path={start}"]) if todo else contextlib.nullcontext() as url:
        if todo:
            make_datasets(url, data)  # first: the server still holds the start policy
            probe = KLProbe(start, data["start"])
        for i, (source, method, seed) in enumerate(todo, 1):
            name = f"{source}_{method}_seed{seed}"
            offline = [] if source == "online" else [
                "rollout.source=offline", f"data.path={data[source]}", "rollout.eval_offline=true",
                "data.max_prompt_tokens=20", "data.max_response_tokens=12"]
            result = _rl.rl_run(url, RUNS / name, common(start, method, seed) + offline)
            result["kl_probe"] = probe.kl(RUNS / name)
            log.add({"name": name, "source": source, "method": method, "seed": seed, **result})
            print(f"[{i}/{len(todo)}] {name}: held-out greedy {result['start_greedy']:.1%} -> "
                  f"{result['final_greedy']:.1%}, KL to start {result['kl_probe']:.3f}, {result['seconds']:.0f} s",
                  flush=True)
    tabular_table = tabular(args.out / "tabular")
    runs = [r for r in log.runs.values() if r["seed"] in args.seeds]
    plot(runs, args.out / "off_policy.png")
    rewards = {name: dataset_reward(path) for name, path in data.items()}
    print(f"this invocation: {time.perf_counter() - t0:.0f} s")
    publish(report(runs, rewards, tabular_table), args.out / "table.md")


if __name__ == "__main__":
    main()
