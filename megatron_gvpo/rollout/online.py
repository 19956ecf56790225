"""Online batches for the trainer: prompts -> SGLang grouped rollout -> rewards -> the trainer's batch dict.

`OnlineSource` is what megatron_gvpo/train.py's loop talks to when `rollout.source: online`:

    source = OnlineSource(cfg, engine, arch, tokenizer, step)   # starts (or attaches to) SGLang servers
    batch, metrics = source.next_batch()                        # one batch of whole groups, on every rank
    source.sync_weights(step)                                   # the trainer's weights -> every server
    metrics = source.evaluate()                                 # held-out accuracy, greedy and pass@k

Global rank 0 talks to SGLang and scores the rewards; every rank gets the same batch (broadcast) and takes
part in the weight sync (a collective). The servers start from the trainer's own weights, written as an HF
directory under <run.dir>/rollout_init (whatever `model.init`/`model.load`/a resumed checkpoint made them),
with weight version `step-<N>` of the step the run starts at; every later sync sets `step-<step>`, and every
rollout checks that all its samples carry the version of the last sync (`require_weight_version`).

Which samples train: a group whose sample was aborted (a server dropped it) or whose reward failed under
`reward.on_error: drop_group` is left out. It is not removed from the batch (Megatron's micro-batch layout is
fixed); its rows become groups of one, which carry no GVPO signal and do not count in the loss normaliser.
Truncated samples ('length': max_new_tokens reached) are scored as they are and counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from megatron_gvpo.data.offline import Group, GroupSampler, collate
from megatron_gvpo.data.prompts import Prompt, load_prompts
from megatron_gvpo.rollout.base import RolloutError, SamplingParams, require_weight_version


@dataclass
class RolloutConfig:
    source: Literal["offline", "online"] = "offline"
    """'offline': train on data.path's scored groups; 'online': sample groups with SGLang from prompts.path."""
    urls: list[str] = field(default_factory=list)
    """SGLang servers to attach to (http://host:port); empty: start `servers` of them from the trainer."""
    servers: int = 1
    """SGLang servers to start (on this machine) when `urls` is empty."""
    server_tp: int = 1
    """Tensor-parallel size of each started server."""
    max_total_tokens: int | None = None
    """KV-cache tokens of each started server (SGLang's --max-total-tokens); None: SGLang's default."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    """Longest response; a sample that reaches it is marked truncated ('length')."""
    weight_sync: Literal["disk", "tensor", "distributed"] = "distributed"
    """How trained weights reach the servers (megatron_gvpo/rollout/weight_sync.py): 'disk' (safetensors in
    <run.dir>/rollout_weights; needs a file system shared with the servers), 'tensor' (shared memory; servers on
    the trainer's machine) or 'distributed' (a process group with the servers; NCCL on GPUs, gloo on CPU)."""
    bucket_mb: int = 256
    """Bucket size of the tensor and distributed syncs."""
    startup_timeout_s: float = 300.0
    """How long a started server may take to become healthy."""
    request_timeout_s: float = 600.0
    """Deadline of one rollout or weight-update request."""
    retries: int = 2
    """Retries of a rollout request on another server after a connection failure."""
    eval_interval: int = 0
    """Evaluate every this many rollout steps (and before the first and after the last); 0: only those two."""
    eval_k: int = 4
    """Samples per held-out prompt for pass@k (at eval_temperature); 1 disables it."""
    eval_temperature: float = 1.0
    correct_reward: float = 1.0
    """A response whose reward is at least this counts as correct (accuracy, pass@k)."""

    def validate(self) -> None:
        if self.servers < 1 or self.server_tp < 1:
            raise ValueError(
                f"rollout.servers and rollout.server_tp must be >= 1, got {self.servers}, {self.server_tp}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 for grouped sampling, got {self.temperature}")
        if self.eval_interval < 0 or self.eval_k < 1 or self.bucket_mb < 1:
            raise ValueError("rollout.eval_interval must be >= 0, rollout.eval_k and rollout.bucket_mb >= 1")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"rollout.urls: {url!r} must start with http:// or https://")


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def version(step: int) -> str:
    return f"step-{step}"


class OnlineSource:
    """Rollout, rewards and weight sync for the training loop (module docstring)."""

    def __init__(self, cfg, engine, arch, tokenizer, start_step: int):
        from megatron_gvpo.models.arch import padded_vocab_size
        from megatron_gvpo.rollout.weight_sync import write_hf_checkpoint

        self.cfg, self.engine, self.arch, self.tokenizer = cfg, engine, arch, tokenizer
        self.r = cfg.rollout
        self.rank0 = dist.get_rank() == 0
        self.padded_vocab = padded_vocab_size(arch.vocab_size, engine.ctx.tp_size)
        self.run_dir = Path(cfg.run.dir)
        prompts, self.stats = load_prompts(cfg.prompts.path, cfg.prompts, tokenizer, arch.vocab_size)
        self.sampler = GroupSampler(prompts, cfg.groups_per_rollout, seed=cfg.run.seed, shuffle=cfg.prompts.shuffle)
        self.eval_prompts: list[Prompt] = []
        if cfg.prompts.eval_path:
            self.eval_prompts, _ = load_prompts(cfg.prompts.eval_path, cfg.prompts, tokenizer, arch.vocab_size)
            if cfg.prompts.eval_size:
                self.eval_prompts = self.eval_prompts[: cfg.prompts.eval_size]
        self.sampling = SamplingParams(n=cfg.algo.group_size, temperature=self.r.temperature, top_p=self.r.top_p,
                                       max_new_tokens=self.r.max_new_tokens)
        self.servers, self.client, self.weights = [], None, None

        # Servers start from the trainer's weights, so they agree with it whatever initialised or resumed it.
        hf_dir = self.run_dir / "rollout_init"
        assets = Path(cfg.model.tokenizer or cfg.model.path)
        write_hf_checkpoint(engine.chunks, arch, engine.ctx, self.padded_vocab, hf_dir, assets)
        if self.rank0 and cfg.model.tokenizer:
            from megatron_gvpo.models.hf_io import copy_hf_assets

            copy_hf_assets(Path(cfg.model.path), hf_dir)  # the config, when the tokenizer lives elsewhere
        self.version = version(start_step)
        urls = self._start_servers(hf_dir) if self.rank0 else None
        self.urls = _broadcast(urls)
        if self.r.weight_sync == "distributed":
            from megatron_gvpo.rollout.weight_sync import DistributedWeightSync

            self.weights = DistributedWeightSync(arch, engine.ctx, self.padded_vocab, self.urls,
                                                 bucket_bytes=self.r.bucket_mb << 20,
                                                 timeout_s=self.r.request_timeout_s)
            self.weights.connect()

    def _start_servers(self, hf_dir: Path) -> list[str]:
        from megatron_gvpo.rollout.sglang import SGLangClient, SGLangServer, SGLangServerConfig

        r = self.r
        urls = list(r.urls)
        if not urls:
            _share_cores_with_servers(r.servers)
            logs = self.run_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for i in range(r.servers):
                server = SGLangServer(SGLangServerConfig(
                    model_path=str(hf_dir), tp=r.server_tp, random_seed=self.cfg.run.seed + i,
                    weight_version=self.version, max_total_tokens=r.max_total_tokens,
                    startup_timeout_s=r.startup_timeout_s, log_path=str(logs / f"sglang_{i}.log")))
                self.servers.append(server.start())
                urls.append(server.url)
        self.client = SGLangClient(urls, timeout_s=r.request_timeout_s, retries=r.retries)
        return urls

    # ------------------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[dict, dict]:
        """Collective: the next batch of whole groups sampled by the servers, on every rank."""
        prompts = self.sampler.next_batch()  # every rank advances the sampler, so its state is everywhere
        out = self._rollout(prompts) if self.rank0 else None
        return _broadcast(out)

    def _sample_and_score(self, prompts: list[Prompt], sampling: SamplingParams):
        """(groups, [(prompt, sample)] flat, RewardResult, seconds generating): the served policy's samples,
        checked to come from the last synced weights, and their rewards."""
        from megatron_gvpo.rewards import score

        t0 = time.perf_counter()
        groups = self.client.generate([list(p.ids) for p in prompts], sampling)
        t_generate = time.perf_counter() - t0
        require_weight_version(groups, self.version)
        samples = [(p, x) for p, g in zip(prompts, groups, strict=True) for x in g]
        result = score([p.text for p, _ in samples], [self._decode(x.token_ids) for _, x in samples],
                       [p.label for p, _ in samples], [i // sampling.n for i in range(len(samples))], self.cfg.reward)
        return groups, samples, result, t_generate

    def _rollout(self, prompts: list[Prompt]) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        groups, samples, result, t_rollout = self._sample_and_score(prompts, self.sampling)
        k = self.sampling.n
        aborted = {i // k for i, (_, x) in enumerate(samples) if x.finish_reason == "abort"}
        dropped = aborted | {i // k for i, keep in enumerate(result.keep) if not keep}
        batch = collate([Group(tuple(p.ids), tuple(tuple(x.token_ids) for x in g),
                               tuple(result.rewards[i * k:(i + 1) * k]), p.source)
                         for i, (p, g) in enumerate(zip(prompts, groups, strict=True))],
                        seq_len=self.cfg.model.seq_length)
        batch["group_ids"] = _ungroup(batch["group_ids"], dropped)
        rewards = torch.tensor(result.rewards)
        correct = (rewards >= self.r.correct_reward).float()
        by_group = rewards.view(-1, k)
        metrics = {
            "reward_mean": float(rewards.mean()), "accuracy": float(correct.mean()),
            "response_len_mean": sum(len(x.token_ids) for _, x in samples) / len(samples),
            "truncated_frac": sum(x.finish_reason == "length" for _, x in samples) / len(samples),
            "aborted_groups": len(aborted), "dropped_groups": len(dropped),
            "equal_reward_groups": int((by_group.max(1).values == by_group.min(1).values).sum()),
            "rollout_logp_mean": sum(sum(x.logprobs) for _, x in samples) / len(samples),
            "time_rollout_s": t_rollout, "time_reward_s": time.perf_counter() - t0 - t_rollout,
            **result.metrics(),
        }
        return batch, metrics

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------------------------------------
    def sync_weights(self, step: int) -> float:
        """Collective: the trainer's current weights into every server as version `step-<step>`; seconds."""
        from megatron_gvpo.rollout.weight_sync import sync_weights_from_disk, sync_weights_from_tensor

        t0 = time.perf_counter()
        new, e = version(step), self.engine
        if self.weights is not None:
            self.weights.sync(e.chunks, new)
        elif self.r.weight_sync == "tensor":
            sync_weights_from_tensor(e.chunks, self.arch, e.ctx, self.padded_vocab, self.urls, new,
                                     bucket_bytes=self.r.bucket_mb << 20, timeout_s=self.r.request_timeout_s)
        else:
            sync_weights_from_disk(e.chunks, self.arch, e.ctx, self.padded_vocab, self.urls,
                                   self.run_dir / "rollout_weights", self.run_dir / "rollout_init", new,
                                   timeout_s=self.r.request_timeout_s)
        self.version = new
        return time.perf_counter() - t0

    def evaluate(self) -> dict:
        """Held-out accuracy under the served weights: greedy, and pass@k at eval_temperature (rank 0's
        numbers; other ranks get an empty dict)."""
        if not self.eval_prompts or not self.rank0:
            return {}
        t0 = time.perf_counter()
        metrics = {}
        runs = [("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=self.r.max_new_tokens))]
        if self.r.eval_k > 1:
            runs.append((f"pass@{self.r.eval_k}", SamplingParams(n=self.r.eval_k, temperature=self.r.eval_temperature,
                                                               max_new_tokens=self.r.max_new_tokens)))
        for name, sampling in runs:
            _, _, result, _ = self._sample_and_score(self.eval_prompts, sampling)
            correct = torch.tensor(result.rewards).view(-1, sampling.n) >= self.r.correct_reward
            metrics[f"eval_{name}"] = float(correct.any(1).float().mean())
        metrics["eval_weight_version"] = self.version
        metrics["time_eval_s"] = time.perf_counter() - t0
        return metrics

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        try:
            if self.weights is not None:
                self.weights.close()
        except RolloutError:
            pass  # the servers go away next anyway
        for server in self.servers:
            server.stop()


def _share_cores_with_servers(servers: int) -> None:
    """On CPU the trainer and the servers it starts share this machine's cores. Each server runs one thread; the
    trainer processes of this node get the rest. Oversubscribed torch threads stall each other (measured 10-50x
    slower steps with 2 threads next to a server on 2 cores)."""
    import os

    if torch.cuda.is_available():
        return
    local_trainers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, ((os.cpu_count() or 1) - servers) // local_trainers)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)


def _ungroup(group_ids: torch.Tensor, dropped: set[int]) -> torch.Tensor:
    """Group ids with every row of a dropped group in a group of its own (no GVPO signal, not counted)."""
    if not dropped:
        return group_ids
    out = group_ids.clone()
    fresh = int(group_ids.max()) + 1
    for row in range(len(out)):
        if int(group_ids[row]) in dropped:
            out[row] = fresh
            fresh += 1
    return out
