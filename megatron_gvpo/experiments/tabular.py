"""The paper's optimum, checked numerically: does minimising the GVPO loss reach pi* = pi_ref * exp(R/beta) / Z?

A tabular problem: P prompts, A responses each, a known reference policy pi_ref and known rewards R. The
policy is a free logit table theta [P, A] (so the optimum is reachable exactly), started at pi_ref and trained
with Adam on grouped samples. Theorem 3.1 of the paper says GVPO's unique minimiser is pi* for ANY sampling
distribution covering pi_ref's support, so several samplers are run: on-policy (pi_theta), the reference, the
reference at a higher temperature, a mixture of those two, and uniform (the last three off-policy). GRPO
(std-normalised advantages, ratio clipping against the sampler, k3 KL to pi_ref with the same beta), Dr. GRPO
and DPO (pairs inside each group) are trained on identically drawn data.
The measure is KL(pi_theta || pi*) averaged over prompts; beta * KL(pi_theta || pi*) is also exactly the gap
in the regularised objective E[R] - beta * KL(pi || pi_ref) between pi* and pi_theta.

Run:  python -m megatron_gvpo.experiments.tabular [--config configs/tabular_optimum.yaml] [--set steps=500]
Writes table.md, curves.png and results.jsonl into run.dir and prints the table. Exits non-zero when a GVPO
run ends above `kl_threshold`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from megatron_gvpo.algo import (
    dpo_loss,
    dr_grpo_loss,
    group_advantages,
    grpo_loss,
    gvpo_loss,
    preference_pairs,
)
from megatron_gvpo.config import RunConfig, add_config_arguments, load_config, to_dict
from megatron_gvpo.utils.cli import run_main, user_errors

Sampler = Literal["on_policy", "reference", "tempered", "mixture", "uniform"]
Method = Literal["gvpo", "grpo", "dr_grpo", "dpo"]


@dataclass
class TabularConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/tabular_optimum"))
    """Output directory; run.seed offsets every seed below."""
    prompts: int = 4
    """Prompts (independent bandit problems) per tabular problem."""
    responses: int = 16
    """Possible responses per prompt (the size of each policy's support)."""
    beta: float = 0.5
    """KL strength shared by all methods (GVPO's beta, GRPO's KL coefficient, DPO's beta)."""
    group_size: int = 4
    """k, responses sampled per group."""
    groups_per_prompt: int = 4
    """Groups sampled for every prompt at each step."""
    steps: int = 1500
    """Adam steps per run."""
    lr: float = 0.05
    """Adam learning rate (cosine-decayed to 1% over the run)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Each seed draws a new problem (pi_ref, R) and new samples."""
    samplers: list[Sampler] = field(default_factory=lambda: ["on_policy", "reference", "uniform"])
    """Sampling distributions: the current policy, pi_ref, pi_ref at `temperature` ('tempered': proportional to
    pi_ref^(1/T)), the half-half mixture of pi_ref and the tempered one, or uniform over responses."""
    temperature: float = 1.5
    """Temperature of the 'tempered' sampler (and of the tempered half of 'mixture')."""
    methods: list[Method] = field(default_factory=lambda: ["gvpo", "grpo", "dr_grpo", "dpo"])
    """Objectives trained on the same samples."""
    eval_interval: int = 25
    """Steps between recorded points of the KL curve."""
    kl_threshold: float = 1e-3
    """GVPO must end below this KL(pi_theta || pi*) for the experiment to pass."""
    plot: bool = True
    """Write curves.png (needs matplotlib)."""

    def validate(self) -> None:
        for name in ("prompts", "steps", "groups_per_prompt", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.responses < 2:
            raise ValueError(f"responses must be >= 2, got {self.responses}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if not self.beta > 0 or not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"beta, lr and temperature must be > 0, got beta={self.beta}, lr={self.lr}, "
                             f"temperature={self.temperature}")
        if not self.seeds or not self.samplers or not self.methods:
            raise ValueError("seeds, samplers and methods must each name at least one entry")


@dataclass
class Problem:
    ref_logp: torch.Tensor
    """[P, A] log pi_ref."""
    rewards: torch.Tensor
    """[P, A] reward of each response."""
    beta: float

    @property
    def optimum_logp(self) -> torch.Tensor:
        """[P, A] log pi* = log softmax(log pi_ref + R / beta)."""
        return torch.log_softmax(self.ref_logp + self.rewards / self.beta, dim=-1)

    def kl_to_optimum(self, logits: torch.Tensor) -> float:
        """Mean over prompts of KL(pi_theta || pi*), clamped at 0 against float64 rounding (~1e-17)."""
        logp = torch.log_softmax(logits.detach(), dim=-1)
        return max(0.0, float((logp.exp() * (logp - self.optimum_logp)).sum(-1).mean()))


def make_problem(cfg: TabularConfig, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    ref_logits = 1.5 * torch.randn(cfg.prompts, cfg.responses, generator=g, dtype=torch.float64)
    rewards = torch.rand(cfg.prompts, cfg.responses, generator=g, dtype=torch.float64)
    return Problem(torch.log_softmax(ref_logits, -1), rewards, cfg.beta)


def sample_groups(cfg: TabularConfig, problem: Problem, sampler: Sampler, logits: torch.Tensor, g: torch.Generator):
    """Draw groups_per_prompt groups of group_size responses for every prompt.

    Returns prompt [N], response [N], group id [N] and the sampler's log-prob of each response [N].
    """
    if sampler == "on_policy":
        sampler_logp = torch.log_softmax(logits.detach(), -1)
    elif sampler == "reference":
        sampler_logp = problem.ref_logp
    elif sampler in ("tempered", "mixture"):
        sampler_logp = torch.log_softmax(problem.ref_logp / cfg.temperature, -1)
        if sampler == "mixture":
            half = torch.log(torch.tensor(0.5, dtype=sampler_logp.dtype))
            sampler_logp = torch.logaddexp(problem.ref_logp + half, sampler_logp + half)
    else:
        sampler_logp = torch.full_like(problem.ref_logp, -torch.log(torch.tensor(float(cfg.responses))).item())
    per_prompt = cfg.groups_per_prompt * cfg.group_size
    response = torch.multinomial(sampler_logp.exp(), per_prompt, replacement=True, generator=g).reshape(-1)
    prompt = torch.arange(cfg.prompts).repeat_interleave(per_prompt)
    group = torch.arange(cfg.prompts * cfg.groups_per_prompt).repeat_interleave(cfg.group_size)
    return prompt, response, group, sampler_logp[prompt, response]


def method_loss(method: Method, cfg: TabularConfig, problem: Problem, logits: torch.Tensor, batch) -> torch.Tensor:
    prompt, response, group, sampler_logp = batch
    logp = torch.log_softmax(logits, -1)[prompt, response]
    ref = problem.ref_logp[prompt, response]
    rewards = problem.rewards[prompt, response]
    if method == "gvpo":
        return gvpo_loss(logp, ref, rewards, group, cfg.beta)
    # One action per response: the token tensors of the policy-gradient baselines are [N, 1].
    mask = torch.ones(logp.numel(), 1, dtype=torch.bool)
    if method == "grpo":
        adv = group_advantages(rewards, group, scale_by_std=True)
        return grpo_loss(logp[:, None], sampler_logp[:, None], adv, mask, ref_token_logp=ref[:, None], kl_coef=cfg.beta)
    if method == "dr_grpo":
        adv = group_advantages(rewards, group, scale_by_std=False)
        return dr_grpo_loss(logp[:, None], sampler_logp[:, None], adv, mask)
    chosen, rejected = preference_pairs(rewards, group)
    return dpo_loss(logp[chosen], logp[rejected], ref[chosen], ref[rejected], cfg.beta)


def train_one(cfg: TabularConfig, method: Method, sampler: Sampler, seed: int) -> list[tuple[int, float]]:
    """Train one logit table; return the KL-to-optimum curve [(step, kl), ...]."""
    problem = make_problem(cfg, cfg.run.seed + seed)
    logits = problem.ref_logp.clone().requires_grad_()
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=0.01 * cfg.lr)
    # Same data stream for every method: the generator depends on (seed, sampler) only.
    g = torch.Generator().manual_seed(10_000 * (cfg.run.seed + seed) + cfg.samplers.index(sampler))
    curve = [(0, problem.kl_to_optimum(logits))]
    for step in range(1, cfg.steps + 1):
        batch = sample_groups(cfg, problem, sampler, logits, g)
        loss = method_loss(method, cfg, problem, logits, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            curve.append((step, problem.kl_to_optimum(logits)))
    return curve


def run_experiment(cfg: TabularConfig, log=print) -> list[dict]:
    """Every (method, sampler, seed); returns one record per run with its curve and final KL."""
    records = []
    total = len(cfg.methods) * len(cfg.samplers) * len(cfg.seeds)
    t0 = time.perf_counter()
    for method in cfg.methods:
        for sampler in cfg.samplers:
            for seed in cfg.seeds:
                curve = train_one(cfg, method, sampler, seed)
                records.append(dict(method=method, sampler=sampler, seed=seed, final_kl=curve[-1][1], curve=curve))
                log(
                    f"[{len(records)}/{total}] {method:8s} {sampler:10s} seed {seed}: "
                    f"KL(pi||pi*) {curve[0][1]:.3e} -> {curve[-1][1]:.3e}  ({time.perf_counter() - t0:.0f}s)"
                )
    return records


def summary_table(cfg: TabularConfig, records: list[dict]) -> str:
    lines = [
        f"KL(pi_theta || pi*) after {cfg.steps} Adam steps (beta={cfg.beta}, {cfg.prompts} prompts x "
        f"{cfg.responses} responses, k={cfg.group_size}, {cfg.groups_per_prompt} groups/prompt/step, "
        f"seeds {cfg.seeds}); start: pi_theta = pi_ref.",
        "",
        "| method | sampler | mean final KL | max final KL | start KL |",
        "|---|---|---|---|---|",
    ]
    for method in cfg.methods:
        for sampler in cfg.samplers:
            rs = [r for r in records if r["method"] == method and r["sampler"] == sampler]
            finals = [r["final_kl"] for r in rs]
            start = sum(r["curve"][0][1] for r in rs) / len(rs)
            lines.append(
                f"| {method} | {sampler} | {sum(finals) / len(finals):.2e} | {max(finals):.2e} | {start:.2e} |"
            )
    return "\n".join(lines)


def plot_curves(cfg: TabularConfig, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.samplers), figsize=(5 * len(cfg.samplers), 4), sharey=True, squeeze=False)
    colors = {"gvpo": "tab:blue", "grpo": "tab:red", "dr_grpo": "tab:orange", "dpo": "tab:green"}
    for ax, sampler in zip(axes[0], cfg.samplers, strict=True):
        for method in cfg.methods:
            for i, r in enumerate(x for x in records if x["method"] == method and x["sampler"] == sampler):
                steps, kls = zip(*r["curve"], strict=True)
                ax.plot(steps, [max(k, 1e-12) for k in kls], color=colors[method], alpha=0.8,
                        label=method if i == 0 else None)
        ax.axhline(cfg.kl_threshold, color="gray", linestyle="--", linewidth=1,
                   label="threshold" if ax is axes[0][0] else None)
        ax.set_yscale("log")
        ax.set_title(f"samples from: {sampler}")
        ax.set_xlabel("Adam step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("KL(pi_theta || pi*)  (floored at 1e-12)")
    axes[0][0].legend()
    fig.suptitle(f"Distance to the KL-regularised optimum pi* (beta={cfg.beta})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, default_config=None)
    args = parser.parse_args(argv)
    with user_errors():
        cfg = load_config(TabularConfig, args.config, args.overrides)
    torch.set_num_threads(1)
    out = Path(cfg.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    records = run_experiment(cfg)
    table = summary_table(cfg, records)
    (out / "table.md").write_text(table + "\n")
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print("\n" + table)
    if cfg.plot:
        plot_curves(cfg, records, out / "curves.png")
        print(f"\nplot: {out / 'curves.png'}")

    gvpo = [r for r in records if r["method"] == "gvpo"]
    failed = [r for r in gvpo if not r["final_kl"] < cfg.kl_threshold]
    for r in failed:
        print(f"FAIL: gvpo/{r['sampler']}/seed {r['seed']} ended at KL {r['final_kl']:.3e} >= {cfg.kl_threshold}")
    if gvpo and not failed:
        print(f"PASS: every GVPO run reached KL(pi_theta || pi*) < {cfg.kl_threshold}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main("megatron_gvpo.experiments.tabular", main))
