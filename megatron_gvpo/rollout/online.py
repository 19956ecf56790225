"""Online batches for the trainer: prompts -> SGLang grouped rollout -> rewards -> the trainer's batch dict.

`OnlineSource` is what megatron_gvpo/train.py's loop talks to when `rollout.source` is 'online' or 'mix':

    source = OnlineSource(cfg, engine, arch, tokenizer, step)   # starts (or attaches to) SGLang servers
    batch, metrics = source.next_batch()                        # one batch of whole groups, on every rank
    source.sync_weights(step)                                   # the trainer's weights -> every server
    metrics = source.evaluate()                                 # held-out accuracy, greedy and pass@k

Global rank 0 talks to SGLang and scores the rewards; every rank gets the same batch (broadcast) and takes
part in the weight sync (a collective). The servers start from the trainer's own weights, written as an HF
directory under <run.dir>/rollout_init (whatever `model.init`/`model.load`/a resumed checkpoint made them),
with weight version `step-<N>` of the step the run starts at (servers it attaches to, `rollout.urls`, get those
weights by a sync before the first request); every later sync sets `step-<step>`, and every
rollout checks that all its samples carry the version of the last sync (`require_weight_version`), or, with
`rollout.mode: async` (rollout/pipeline.py), one of the versions synced while it ran.

Which samples train: a group whose sample was aborted (a server dropped it) or whose reward failed under
`reward.on_error: drop_group` is left out. It is not removed from the batch (Megatron's micro-batch layout is
fixed); its rows become groups of one, which carry no GVPO signal and do not count in the loss normaliser.
Truncated samples ('length': max_new_tokens reached) are counted and, per `rollout.on_truncated`, kept as
scored, given reward 0, or left out with their group. Responses end at the checkpoint's own end-of-turn ids
(generation_config.json, config.json and the tokenizer's EOS: `models.hf_io.eos_token_ids`).

A server this run started that dies is restarted: whichever collective noticed (rollout, weight sync or
evaluation) restarts it on rank 0, reconnects the weight sync, reloads the trainer's current weights and runs
again (`rollout.max_server_restarts`). Attached servers that their launcher restarts (`rollout.urls_supervised`)
are waited for instead, then reloaded the same way. With `rollout.source: mix`, part of every batch is replayed
from the newest earlier groups (`ReplayBuffer`); the trainer recomputes pi_old / pi_ref for them like for fresh
ones.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gvpo.data.groups import collate, Group, GroupSampler
from megatron_gvpo.data.prompts import Prompt, load_prompts
from megatron_gvpo.rollout.base import RolloutError, SamplingParams, require_weight_version


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _on_rank0(fn, *args):
    """Collective: fn(*args) on global rank 0, its result on every rank. An exception there raises on every
    rank (a rank left waiting in the next collective would hang the job): the original on rank 0, a
    RolloutError (which the caller may recover from) or a RuntimeError naming it on the others."""
    out, raised = None, None
    if dist.get_rank() == 0:
        try:
            out = (fn(*args), None, False)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            raised, out = e, (None, f"{type(e).__name__} on rank 0: {e}", isinstance(e, RolloutError))
    result, error, recoverable = _broadcast(out)
    if raised is not None:
        raise raised
    if error is not None:
        raise RolloutError(error) if recoverable else RuntimeError(error)
    return result


def version(step: int) -> str:
    return f"step-{step}"


def version_number(name: str) -> int:
    """The step of a weight version `version(step)`."""
    prefix, _, number = name.partition("-")
    if prefix != "step" or not number.isdigit():
        raise ValueError(f"weight version {name!r} is not one this trainer set (step-<N>)")
    return int(number)


def versions_between(first: str, last: str) -> set[str]:
    """The weight versions synced from `first` to `last`, both included."""
    return {version(n) for n in range(version_number(first), version_number(last) + 1)}


class OnlineSource:
    """Rollout, rewards and weight sync for the training loop (module docstring)."""

    def __init__(self, cfg, engine, arch, tokenizer, start_step: int):
        from megatron_gvpo.models.arch import padded_vocab_size
        from megatron_gvpo.models.hf_io import eos_token_ids
        from megatron_gvpo.rollout.weight_sync import write_hf_checkpoint

        self.cfg, self.engine, self.arch, self.tokenizer = cfg, engine, arch, tokenizer
        self.r = cfg.rollout
        self.rank0 = dist.get_rank() == 0
        self.padded_vocab = padded_vocab_size(arch.vocab_size, engine.ctx.tp_size)
        self.run_dir = Path(cfg.run.dir)
        self.sampler = None  # source 'offline' (rollout.eval_offline): evaluation only, the data come from elsewhere
        if self.r.source != "offline":
            prompts, self.stats = load_prompts(cfg.prompts.path, cfg.prompts, tokenizer, arch.vocab_size,
                                               needs_label=cfg.reward.needs_label)
            self.sampler = GroupSampler(prompts, cfg.groups_per_rollout, seed=cfg.run.seed,
                                        shuffle=cfg.prompts.shuffle)
        self.replay = ReplayBuffer(self.r.replay_capacity, seed=cfg.run.seed) if self.r.source == "mix" else None
        self.eval_prompts: list[Prompt] = []
        if cfg.prompts.eval_path:
            self.eval_prompts, _ = load_prompts(cfg.prompts.eval_path, cfg.prompts, tokenizer, arch.vocab_size,
                                                needs_label=cfg.reward.needs_label, field_name="prompts.eval_path")
            if cfg.prompts.eval_size:
                self.eval_prompts = self.eval_prompts[: cfg.prompts.eval_size]
        self.step = start_step  # the rollout step being trained; seeds the samples when rollout.seeded
        self.drawn: dict[int, list[Prompt]] = {}  # every rank: prompts of the steps submitted, not yet trained
        self.pipeline = None  # rank 0, rollout.mode 'async': the producer (rollout/pipeline.py)
        self._decoding = threading.Lock()  # a fast tokenizer refuses concurrent use (pipeline and evaluation)
        # An instruct model ends its turn with its own token (generation_config.json), not only config.json's EOS.
        self.stop_token_ids = eos_token_ids(cfg.model.path, tokenizer)
        self.servers, self.client, self.weights = [], None, None
        self.restarts = 0  # servers restarted (rank 0 restarts them, or waits for their supervisor to)
        self.synced = False  # rank 0: the servers have had this run's weights (attached ones start without)
        self.reconnects = 0  # recoveries, on every rank: names the weight-sync groups

        # Servers start from the trainer's weights, so they agree with it whatever initialised or resumed it.
        hf_dir = self.run_dir / "rollout_init"
        assets = Path(cfg.model.tokenizer or cfg.model.path)
        write_hf_checkpoint(engine.chunks, arch, engine.ctx, self.padded_vocab, hf_dir, assets)
        if self.rank0 and cfg.model.tokenizer:
            from megatron_gvpo.models.hf_io import copy_hf_assets

            copy_hf_assets(Path(cfg.model.path), hf_dir)  # the config, when the tokenizer lives elsewhere
        self.version = version(start_step)
        self.urls = _on_rank0(self._start_servers, hf_dir)
        self._connect()
        if self.r.urls:  # attached servers hold whatever they were started with (the launcher: random weights)
            self._resilient(lambda: self._sync(self.version), reload_weights=False)
        if self.rank0 and self.r.mode == "async":
            from megatron_gvpo.rollout.pipeline import RolloutPipeline

            self.pipeline = RolloutPipeline(self._rollout)

    def _start_servers(self, hf_dir: Path) -> list[str]:
        from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

        r = self.r
        urls = list(r.urls)
        if not urls:
            _share_cores_with_servers(r.servers)
            budget = _server_budget(self.cfg, self.arch, len(self.eval_prompts))
            logs = self.run_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for i in range(r.servers):
                server = SGLangServer(SGLangServerConfig(
                    model_path=str(hf_dir), tp=r.server_tp, random_seed=self.cfg.run.seed + i,
                    deterministic=r.seeded and torch.cuda.is_available(),
                    custom_logit_processor=r.seeded and not torch.cuda.is_available(),
                    weight_version=self.version, max_total_tokens=budget.max_total_tokens,
                    max_running_requests=budget.max_running_requests, startup_timeout_s=r.startup_timeout_s,
                    return_routed_experts=r.routing_replay, log_path=str(logs / f"sglang_{i}.log")))
                self.servers.append(server.start())
                urls.append(server.url)
        self._new_client(urls)
        return urls

    def _new_client(self, urls: list[str]) -> None:
        from megatron_gvpo.rollout.sglang import SGLangClient

        shape = (self.arch.num_layers, self.arch.moe_top_k) if self.r.routing_replay else None
        self.client = SGLangClient(urls, timeout_s=self.r.request_timeout_s, retries=self.r.retries,
                                   routed_experts_shape=shape)

    def _connect(self) -> None:
        """Collective: the distributed weight sync's process groups with the current servers (a fresh name after
        a restart, so no server confuses it with the group it lost)."""
        if self.r.weight_sync == "distributed":
            from megatron_gvpo.rollout.weight_sync import DistributedWeightSync

            self.weights = DistributedWeightSync(self.arch, self.engine.ctx, self.padded_vocab, self.urls,
                                                 bucket_bytes=self.r.bucket_mb << 20,
                                                 timeout_s=self.r.request_timeout_s,
                                                 group_prefix=f"megatron_gvpo_r{self.reconnects}")
            self.weights.connect()

    # ------------------------------------------------------------------------------------------------
    def _resilient(self, work, *, reload_weights: bool = True):
        """Collective: work() (collective); when it fails with a RolloutError, restart this run's dead servers
        (`_recover`, which reloads the trainer's weights into them unless the work is itself a weight sync that
        is about to be retried) and do it again."""
        while True:
            try:
                return work()
            except RolloutError as error:
                self._recover(error, reload_weights)

    def _recover(self, error: RolloutError, reload_weights: bool = True) -> None:
        """Collective: restart the servers this run started that died, reconnect the weight sync and (with
        `reload_weights`) load the trainer's current weights into them; re-raise `error` when there is nothing
        to restart or the restart budget is spent."""
        from megatron_gvpo.utils.logging import get_logger

        outcome = self._restart_dead_servers(error) if self.rank0 else None
        urls, failure = _broadcast(outcome)
        if failure is not None:
            raise RolloutError(failure) from error
        self.reconnects += 1
        get_logger().warning(f"{error}: restarted the dead SGLang server(s); reloading weights {self.version}")
        if self.weights is not None:
            try:
                self.weights.close()  # the surviving servers leave the old groups; the lost peer's side is gone
            except RolloutError:
                pass
        self.urls = urls
        self._connect()
        if reload_weights:
            self._sync(self.version)
        if self.pipeline is not None:  # requests in flight may have failed with the server, or outlived it
            self.pipeline.resubmit_all()

    def _restart_dead_servers(self, error: RolloutError) -> tuple[list[str] | None, str | None]:
        """Rank 0: (the servers' urls, None), or (None, why the error stands). The servers this run started are
        started again here; attached ones (`rollout.urls`) are awaited while whoever started them does it."""
        from megatron_gvpo.rollout.sglang import health, weight_version

        attached = bool(self.r.urls)
        if attached and not self.r.urls_supervised:
            return None, (f"{error} (the servers in rollout.urls are not restarted by this run; with "
                          "rollout.urls_supervised=true it waits for whoever started them to start them again)")
        if attached:  # dead: no answer, or, once synced, weights other than this run's (started again already)
            dead = [url for url in self.urls
                    if (served := weight_version(url)) is None or (self.synced and not served.startswith("step-"))]
            none_died = "every server in rollout.urls answers with this run's weights: none died"
        else:
            dead = [s for s in self.servers if not s.alive() or not health(s.url)]
            none_died = "no server this run started has died, so there is nothing to restart"
        if not dead:
            return None, f"{error} ({none_died})"
        if self.restarts + len(dead) > self.r.max_server_restarts:
            return None, (f"{error} ({len(dead)} dead server(s); rollout.max_server_restarts="
                          f"{self.r.max_server_restarts} restarts, {self.restarts} used)")
        failure = self._await_answers(dead) if attached else self._start_again(dead)
        if failure:
            return None, f"{error}; {failure}"
        self.restarts += len(dead)
        urls = self.urls if attached else [s.url for s in self.servers]
        self._new_client(urls)
        return urls, None

    @staticmethod
    def _start_again(servers) -> str | None:
        """Rank 0: restart servers this run started; None, or what failed."""
        for server in servers:
            server.stop()
            server.cfg.weight_version = "restarted"  # until the trainer's weights arrive as self.version
            try:
                server.start()
            except RolloutError as e:
                return f"restarting {server.url} failed too: {e}"
        return None

    def _await_answers(self, urls: list[str]) -> str | None:
        """Rank 0: wait, within rollout.startup_timeout_s, until attached servers answer again; None, or which
        did not."""
        from megatron_gvpo.rollout.sglang import health

        deadline = time.monotonic() + self.r.startup_timeout_s
        for url in urls:
            while not health(url):
                if time.monotonic() > deadline:
                    return (f"{url} did not answer again within rollout.startup_timeout_s="
                            f"{self.r.startup_timeout_s:.0f} s (its launcher restarts it: see its log)")
                time.sleep(1.0)
        return None

    # ------------------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[dict, dict]:
        """Collective: the next batch of whole groups (sampled by the servers, and replayed ones for 'mix'),
        on every rank. In async mode it also submits the prompts of the steps up to `max_staleness` ahead."""
        self.step += 1
        ahead = self.r.max_staleness if self.r.mode == "async" else 0
        for step in range(self.step, self.step + ahead + 1):
            if step not in self.drawn:  # every rank draws: the sampler and the replay buffer agree everywhere
                fresh_count = self.cfg.groups_per_rollout - (self._replay_count() if self.replay is not None else 0)
                self.drawn[step] = self.sampler.next_batch(fresh_count)
            if self.pipeline is not None and step not in self.pipeline.submitted():
                self.pipeline.submit(step, self.drawn[step])
        prompts = self.drawn.pop(self.step)
        if self.r.mode == "async":
            fresh, dropped, metrics = self._resilient(lambda: _on_rank0(self._collect, self.step))
        else:
            fresh, dropped, metrics = self._resilient(lambda: _on_rank0(self._rollout, self.step, prompts))
        replayed = []
        if self.replay is not None:
            replayed = self.replay.draw(self.cfg.groups_per_rollout - len(prompts))
            self.replay.add([g for i, g in enumerate(fresh) if i not in dropped])
            metrics.update(replay_groups=len(replayed), replay_buffer_groups=len(self.replay))
        batch = collate(fresh + replayed, seq_len=self.cfg.model.seq_length)  # fresh first: `dropped` indexes it
        batch["group_ids"] = _ungroup(batch["group_ids"], dropped)
        # Which prompts this step sampled, comparable across runs (a resumed asynchronous run's with the
        # uninterrupted one's, whose samples differ).
        metrics["prompts_crc32"] = zlib.crc32(repr([p.ids for p in prompts]).encode())
        return batch, {**metrics, "server_restarts": self.restarts}

    def _collect(self, step: int):
        """Rank 0, async: step `step`'s rollout from the pipeline, checked to be at most max_staleness versions
        older than the weights it trains (version step - 1)."""
        fresh, dropped, metrics = self.pipeline.result(step)
        if metrics["staleness"] > self.r.max_staleness:  # the pipeline's schedule rules it out (module docstring)
            raise RuntimeError(f"rollout step {step} was sampled from weights {metrics['staleness']} versions old, "
                               f"more than rollout.max_staleness={self.r.max_staleness}")
        return fresh, dropped, metrics

    def _seed(self, step: int, purpose: int) -> int | None:
        """The sampling seed of a step's rollout (purpose 0) or evaluation (1) when rollout.seeded; the client
        adds the sample's index. Hashes of int tuples are the same in every process and run."""
        return hash((self.cfg.run.seed, step, purpose)) & (2**62 - 1) if self.r.seeded else None

    def _replay_count(self) -> int:
        want = round(self.r.replay_fraction * self.cfg.groups_per_rollout)
        return want if len(self.replay) >= want else 0  # all fresh until the buffer holds a batch's share

    def _sample_and_score(self, prompts: list[Prompt], sampling: SamplingParams):
        """(groups, [(prompt, sample)] flat, RewardResult, seconds generating, first weight version): the served
        policy's samples, checked to come from the weights synced since they were asked for (in sync mode and
        for evaluations, the last synced ones: nothing is synced meanwhile), and their rewards."""
        from megatron_gvpo.rewards import score

        first = self.version
        t0 = time.perf_counter()
        groups = self.client.generate([list(p.ids) for p in prompts], sampling)
        t_generate = time.perf_counter() - t0
        require_weight_version(groups, versions_between(first, self.version))
        samples = [(p, x) for p, g in zip(prompts, groups, strict=True) for x in g]
        result = score([p.text for p, _ in samples], [self._decode(x.token_ids) for _, x in samples],
                       [p.label for p, _ in samples], [i // sampling.n for i in range(len(samples))], self.cfg.reward,
                       sources=[p.data_source for p, _ in samples])
        return groups, samples, result, t_generate, first

    def _rollout(self, step: int, prompts: list[Prompt]) -> tuple[list[Group], set[int], dict]:
        """(groups, indices of the groups to leave out, metrics): rollout step `step`, scored."""
        t0 = time.perf_counter()
        sampling = SamplingParams(n=self.cfg.algo.group_size, temperature=self.r.temperature, top_p=self.r.top_p,
                                  max_new_tokens=self.r.max_new_tokens, stop_token_ids=self.stop_token_ids,
                                  seed=self._seed(step, 0), return_routed_experts=self.r.routing_replay)
        groups, samples, result, t_rollout, first = self._sample_and_score(prompts, sampling)
        k = sampling.n
        aborted = {i // k for i, (_, x) in enumerate(samples) if x.finish_reason == "abort"}
        truncated = [i for i, (_, x) in enumerate(samples) if x.finish_reason == "length"]
        cut = treat_truncated(result.rewards, truncated, k, self.r.on_truncated)
        dropped = aborted | cut | {i // k for i, keep in enumerate(result.keep) if not keep}
        behaviour = self.cfg.algo.importance_correction != "none"
        scored = [Group(tuple(p.ids), tuple(tuple(x.token_ids) for x in g), tuple(result.rewards[i * k:(i + 1) * k]),
                        p.source, self._routes(len(p.ids), g) if self.r.routing_replay else None,
                        tuple(tuple(x.logprobs) for x in g) if behaviour else None)
                  for i, (p, g) in enumerate(zip(prompts, groups, strict=True))]
        rewards = torch.tensor(result.rewards)
        correct = (rewards >= self.r.correct_reward).float()
        by_group = rewards.view(-1, k)
        metrics = {
            "reward_mean": float(rewards.mean()), "accuracy": float(correct.mean()),
            "response_len_mean": sum(len(x.token_ids) for _, x in samples) / len(samples),
            "truncated_frac": len(truncated) / len(samples), "truncated_samples": len(truncated),
            "truncated_dropped_groups": len(cut),
            "aborted_groups": len(aborted), "dropped_groups": len(dropped),
            "equal_reward_groups": int((by_group.max(1).values == by_group.min(1).values).sum()),
            "rollout_logp_mean": sum(sum(x.logprobs) for _, x in samples) / len(samples),  # NaN if seeded on CPU
            "time_rollout_s": t_rollout, "time_reward_s": time.perf_counter() - t0 - t_rollout,
            # versions by which the batch lags the weights it trains (step - 1), counted from the first that served it
            "staleness": step - 1 - version_number(first),
            "updated_in_flight": sum(x.weight_version != first for _, x in samples),
            **result.metrics(),
        }
        if self.r.routing_replay:  # positions whose experts the trainer will replay
            metrics["routed_positions"] = sum(x.routed_experts.shape[0] for _, x in samples
                                              if x.routed_experts is not None)
        return scored, dropped, metrics

    def _routes(self, prompt_len: int, samples) -> tuple[torch.Tensor, ...]:
        """Each sample's routed experts at the MoE layers (SGLang has a slot for every layer), as `collate` takes
        them. An aborted sample may come without (its group is dropped anyway): unrouted experts stand in."""
        from megatron_gvpo.data.batch import unrouted

        moe = [i for i, is_moe in enumerate(self.arch.moe_layers) if is_moe]

        def routes(x) -> torch.Tensor:
            if x.routed_experts is None:
                return unrouted(1, prompt_len + len(x.token_ids) - 1, len(moe), self.arch.moe_top_k)[0]
            return x.routed_experts[:, moe]

        return tuple(routes(x).to(torch.int16) for x in samples)

    def _decode(self, ids: list[int]) -> str:
        with self._decoding:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------------------------------------
    def sync_weights(self, step: int) -> float:
        """Collective: the trainer's current weights into every server as version `step-<step>`; seconds."""
        t0 = time.perf_counter()
        self._resilient(lambda: self._sync(version(step)), reload_weights=False)
        return time.perf_counter() - t0

    def _sync(self, new: str) -> None:
        # Requests in flight wait in the servers' queues while the update runs (rollout/pipeline.py); without the
        # pause, SGLang's update waits for them to finish.
        from megatron_gvpo.rollout.sglang import pause_generation

        pause = self.r.mode == "async" and self.r.in_flight_updates == "pause"
        if pause:
            _on_rank0(pause_generation, self.urls, self.r.request_timeout_s)
        try:
            self._update(new)
        finally:
            if self.rank0 and pause:
                self._continue_generation()
        self.version, self.synced = new, True

    def _update(self, new: str) -> None:
        from megatron_gvpo.rollout.weight_sync import sync_weights_from_disk, sync_weights_from_tensor

        e = self.engine
        if self.weights is not None:
            self.weights.sync(e.chunks, new)
        elif self.r.weight_sync == "tensor":
            sync_weights_from_tensor(e.chunks, self.arch, e.ctx, self.padded_vocab, self.urls, new,
                                     bucket_bytes=self.r.bucket_mb << 20, timeout_s=self.r.request_timeout_s)
        else:
            sync_weights_from_disk(e.chunks, self.arch, e.ctx, self.padded_vocab, self.urls,
                                   self.run_dir / "rollout_weights", self.run_dir / "rollout_init", new,
                                   timeout_s=self.r.request_timeout_s)

    def _continue_generation(self) -> None:
        """Rank 0, after an update (or a failed one): a server left paused would hold its requests forever."""
        from megatron_gvpo.rollout.sglang import continue_generation
        from megatron_gvpo.utils.logging import get_logger

        try:
            continue_generation(self.urls, self.r.request_timeout_s)
        except RolloutError as e:  # a dead server is restarted unpaused; a live one that refuses is reported
            get_logger().warning(str(e))

    def evaluate(self) -> dict:
        """Collective: held-out accuracy under the served weights, greedy and pass@k at eval_temperature, on
        every rank ({} without eval prompts)."""
        if not self.eval_prompts:
            return {}
        return self._resilient(lambda: _on_rank0(self._evaluate))

    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        metrics = {}
        r = self.r
        stop = self.stop_token_ids
        runs = [("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=r.max_new_tokens, stop_token_ids=stop))]
        if r.eval_k > 1:
            runs.append((f"pass@{r.eval_k}", SamplingParams(n=r.eval_k, temperature=r.eval_temperature,
                                                          max_new_tokens=r.max_new_tokens, stop_token_ids=stop,
                                                          seed=self._seed(self.step, 1))))
        for name, sampling in runs:
            _, _, result, _, _ = self._sample_and_score(self.eval_prompts, sampling)
            correct = torch.tensor(result.rewards).view(-1, sampling.n) >= self.r.correct_reward
            metrics[f"eval_{name}"] = float(correct.any(1).float().mean())
        metrics["eval_weight_version"] = self.version
        metrics["time_eval_s"] = time.perf_counter() - t0
        return metrics

    def state_dict(self) -> dict:
        """The prompt sampler, the replay buffer, and the prompts drawn for steps not yet trained (async mode):
        a resumed run generates those again, from its checkpoint's weights (rollout/pipeline.py)."""
        state = {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}
        if self.drawn:
            state["drawn"] = {step: [dataclasses.astuple(p) for p in prompts] for step, prompts in self.drawn.items()}
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.drawn = {step: [Prompt(*p) for p in prompts] for step, prompts in state.get("drawn", {}).items()}
        if self.replay is not None and "replay" in state:  # a run switched to 'mix' starts with an empty buffer
            self.replay.load_state_dict(state["replay"])

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close(interrupt=self._abort_requests)
        try:
            if self.weights is not None:
                self.weights.close()
        except RolloutError:
            pass  # the servers go away next anyway
        for server in self.servers:
            server.stop()

    def _abort_requests(self) -> None:
        try:
            self.client.abort_all()
        except RolloutError:
            pass  # behind a router: the request in flight runs to its end, the pipeline waits for it


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


def _server_budget(cfg, arch, eval_prompts: int):
    """KV-cache tokens and running requests of each server this run starts: rollout.max_total_tokens and
    rollout.max_running_requests where set, else what the run can have in flight on one server
    (`rollout.sglang.server_budget`). Logs the KV cache's size and the memory free beside it."""
    import psutil

    from megatron_gvpo.rollout.sglang import KV_TOKENS_MARGIN, ServerBudget, server_budget
    from megatron_gvpo.utils.logging import get_logger

    r = cfg.rollout
    groups = cfg.groups_per_rollout if r.source != "offline" else 0  # offline + eval_offline: evaluation only
    derived = server_budget(groups=groups, group_size=cfg.algo.group_size, eval_prompts=eval_prompts,
                            eval_k=r.eval_k, servers=r.servers, max_prompt_tokens=cfg.prompts.max_prompt_tokens,
                            max_new_tokens=r.max_new_tokens)
    budget = ServerBudget(max_running_requests=r.max_running_requests or derived.max_running_requests,
                          max_total_tokens=r.max_total_tokens or derived.max_total_tokens)
    # SGLang's dtype 'auto' is float32 on CPU (SGLangServerConfig.dtype); on GPUs it serves the float32
    # checkpoint the trainer writes in float16.
    dtype_bytes = 2 if torch.cuda.is_available() else 4
    kv = budget.kv_cache_bytes(arch.num_layers, arch.num_query_groups, arch.head_dim, dtype_bytes)
    where = ("rollout.max_total_tokens" if r.max_total_tokens is not None else
             f"{derived.max_running_requests} requests in flight x (prompts.max_prompt_tokens "
             f"{cfg.prompts.max_prompt_tokens} + rollout.max_new_tokens {r.max_new_tokens}) x {KV_TOKENS_MARGIN}")
    available = None if torch.cuda.is_available() else psutil.virtual_memory().available
    free = "" if available is None else f"; {available / 2**30:.1f} GiB memory free"
    get_logger().info(
        f"SGLang server KV cache: {budget.max_total_tokens} tokens ({where}) = {kv / 2**30:.3g} GiB at "
        f"{dtype_bytes} bytes per value, up to {budget.max_running_requests} running requests, each of "
        f"{r.servers} server(s){free}")
    # The trainer has its model and optimizer by now, but its activations and log-prob passes come later, on the
    # same memory: caches that take more than half of what is left are the start of an OOM kill.
    if available is not None and kv * r.servers > available / 2:
        get_logger().warning(
            f"the SGLang servers' KV caches ({r.servers} x {kv / 2**30:.3g} GiB) take more than half of the "
            f"{available / 2**30:.1f} GiB memory free beside the trainer: lower rollout.max_total_tokens")
    return budget


def treat_truncated(rewards: list[float], truncated: list[int], k: int, policy: str) -> set[int]:
    """Apply rollout.on_truncated to the samples at indices `truncated` (groups of k in order): 'zero' sets their
    rewards to 0 in place; returns the groups to leave out ('drop_group': theirs; otherwise none)."""
    if policy == "zero":
        for i in truncated:
            rewards[i] = 0.0
    return {i // k for i in truncated} if policy == "drop_group" else set()


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


class ReplayBuffer:
    """The newest `capacity` scored groups, drawn uniformly without replacement within a batch (source 'mix').
    Every rank holds the same buffer (the groups come from the broadcast rollout) and the same generator, so
    draws agree without communication; `state_dict()` makes a resumed run draw what the uninterrupted one
    would have."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.groups: list[Group] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, groups: list[Group]) -> None:
        self.groups = (self.groups + list(groups))[-self.capacity:]

    def draw(self, count: int) -> list[Group]:
        if count > len(self.groups):
            raise ValueError(f"replay draw of {count} groups from a buffer of {len(self.groups)}")
        return [self.groups[i] for i in torch.randperm(len(self.groups), generator=self.generator)[:count].tolist()]

    def state_dict(self) -> dict:
        return {"groups": [dataclasses.astuple(g) for g in self.groups], "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.groups = [Group(*g) for g in state["groups"]]
        self.generator.set_state(state["generator"])
