"""The `rollout` config section: where groups come from (offline data or SGLang), how they are sampled and
scored, how weights reach the servers, how servers are supervised, and held-out evaluation.

Imports nothing but the standard library: megatron_gvpo/config.py assembles it with the other sections without
importing the rollout loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RolloutConfig:
    source: Literal["offline", "online", "mix"] = "offline"
    """'offline': train on data.path's scored groups; 'online': sample groups with SGLang from prompts.path;
    'mix': online, with `replay_fraction` of every batch replayed from earlier rollouts (GVPO's loss is valid
    for any sampling distribution, so old groups are still unbiased training signal)."""
    mode: Literal["sync", "async"] = "sync"
    """'sync': every rollout samples from the weights the trainer just synced, while the trainer waits (on-policy).
    'async': the next batches are generated while the trainer trains, from weights up to `max_staleness`
    versions old, and weight updates reach the servers while generation is in flight
    (megatron_gvpo/rollout/pipeline.py)."""
    max_staleness: int = 1
    """'async': the most weight versions by which a trained batch may lag the trained weights. 0 generates each
    batch after the previous step's sync (the synchronous schedule); 1 overlaps generation with one training
    step."""
    in_flight_updates: Literal["pause", "drain"] = "pause"
    """'async': what a weight sync does to requests in flight. 'pause': they are paused and continue under the new
    weights (the update lands at once; a sample may span versions). 'drain': the update waits until they finish
    (no sample spans versions, and the servers' prefix caches survive; the trainer waits in the sync instead
    of for its next batch). rollout/pipeline.py compares them."""
    replay_fraction: float = 0.5
    """'mix': share of each batch's groups drawn from the replay buffer (once it holds that many)."""
    replay_capacity: int = 1024
    """'mix': groups kept for replay (the newest; only groups that trained, i.e. not dropped)."""
    urls: list[str] = field(default_factory=list)
    """SGLang servers to attach to (http://host:port); empty: start `servers` of them from the trainer."""
    urls_supervised: bool = False
    """Whoever started the servers in `urls` starts a dead one again (megatron_gvpo/launch/ sets this: its runner
    restarts the servers of its rollout nodes through srun). A failed rollout, sync or evaluation then waits, up to
    startup_timeout_s, for the dead servers to answer again, loads the trainer's weights into them and runs again
    (max_server_restarts). Otherwise a dead attached server ends the run."""
    servers: int = 1
    """SGLang servers to start (on this machine) when `urls` is empty."""
    server_tp: int = 1
    """Tensor-parallel size of each started server."""
    max_total_tokens: int | None = None
    """KV-cache tokens of each started server (SGLang's --max-total-tokens); None: what the run can have in
    flight on one server, with a margin (`rollout.sglang.server_budget`: the larger of a rollout's share,
    groups x algo.group_size, and an evaluation's, eval prompts x eval_k, times prompts.max_prompt_tokens +
    max_new_tokens, times 1.25). SGLang's own default would take most of the memory free when the server starts,
    which a trainer on the same machine then runs out of. Servers this run attaches to (`urls`) keep theirs."""
    max_running_requests: int | None = None
    """Requests each started server decodes at once (SGLang's --max-running-requests); None: as many as the run
    can have in flight on one server (see max_total_tokens)."""
    temperature: float = 1.0
    top_p: float = 1.0
    seeded: bool = False
    """Seed every rollout and evaluation from (run.seed, step), so samples depend on the weights, prompts and
    step only and a resumed run (even after SIGKILL) draws exactly what the uninterrupted one drew. Started
    servers get the means: deterministic inference on GPU, the SeededGumbel logit processor elsewhere
    (megatron_gvpo/rollout/seeded.py; rollout log-probs are then NaN, top_p must be 1)."""
    max_new_tokens: int = 64
    """Longest response; a sample that reaches it is marked truncated ('length')."""
    on_truncated: Literal["keep", "zero", "drop_group"] = "keep"
    """What a truncated sample does: 'keep' its reward as scored, 'zero' it (a cut answer earns nothing, whatever
    it contains), or 'drop_group' (leave its whole group out of training, like a failed reward). Counted in the
    metrics (truncated_samples, truncated_dropped_groups) either way."""
    routing_replay: bool = False
    """Rollout routing replay (R3) for mixture-of-experts models: the servers return the experts they routed
    every token to, and every trainer forward on those samples routes them to the same experts
    (megatron_gvpo/megatron/routing_replay.py)."""
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
    max_server_restarts: int = 3
    """Servers this run started that die (or stop answering /health) are restarted, reloaded with the
    trainer's current weights and the failed rollout, sync or evaluation is repeated, up to this many times
    per process; then the error stands. Attached servers (`urls`) are waited for only when `urls_supervised`."""
    eval_interval: int = 0
    """Evaluate every this many rollout steps (and before the first and after the last); 0: only those two."""
    eval_offline: bool = False
    """source 'offline': evaluate on prompts.eval_path through SGLang all the same (servers started or attached as
    for online runs, synced with the trainer's weights after every step), e.g. to compare training on a fixed
    dataset with online training by the same measure."""
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
        if self.seeded and self.top_p < 1:
            raise ValueError(f"rollout.seeded samples the full distribution; rollout.top_p={self.top_p} must be 1")
        for name in ("max_total_tokens", "max_running_requests"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1 (or null: from the run), got {getattr(self, name)}")
        if self.eval_interval < 0 or self.eval_k < 1 or self.bucket_mb < 1 or self.max_server_restarts < 0:
            raise ValueError("rollout.eval_interval and rollout.max_server_restarts must be >= 0, rollout.eval_k "
                             "and rollout.bucket_mb >= 1")
        if self.source == "mix" and not (0 < self.replay_fraction < 1 and self.replay_capacity >= 1):
            raise ValueError(f"rollout.source='mix' needs 0 < rollout.replay_fraction < 1 (got "
                             f"{self.replay_fraction}) and rollout.replay_capacity >= 1 (got {self.replay_capacity})")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"rollout.urls: {url!r} must start with http:// or https://")
        if self.urls_supervised and not self.urls:
            raise ValueError("rollout.urls_supervised=true but rollout.urls is empty: it says who restarts attached "
                             "servers; the servers the trainer starts itself it restarts itself")
        if self.mode == "async" and self.source == "offline":
            raise ValueError("rollout.mode='async' overlaps generation with training: it needs rollout.source "
                             "'online' or 'mix'")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.routing_replay and self.source == "offline":
            raise ValueError("rollout.routing_replay replays the servers' routing: it needs rollout.source 'online' "
                             "or 'mix'")
