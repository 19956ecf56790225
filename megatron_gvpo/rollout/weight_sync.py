"""Weights from the sharded Megatron trainer to SGLang, named and laid out as Hugging Face tensors.

`hf_tensors(chunks, arch, ctx)` is the common source of every sync method: for each parameter of this rank's
model chunks it gathers the TP shards (an all-gather over the TP group: every TP rank must call it), makes the
full Megatron tensor (`models.sharding.unshard`) and turns it into HF tensors with the converter's name maps
(`models.hf_maps.megatron_to_hf`), yielding them on TP rank 0 of each pipeline stage. Pipeline stages hold
different layers, so each stage contributes its own tensors; DP replicas hold the same ones and only DP rank 0
sends. A mixture of experts' routed experts are split over the expert-parallel ranks, which Megatron carves out
of the data-parallel ones: each expert is gathered over its expert-TP group and then, local expert j of every
EP rank together, over the EP group (the ranks of expert-data-parallel rank 0 take part), and the sender yields
all of them.

Methods:
- disk (`sync_weights_from_disk`): every sending rank streams its stage's tensors into one safetensors file
  of a shared directory, global rank 0 adds the index, config and tokenizer files, then tells each server to
  `/update_weights_from_disk` with the new weight version. The fallback that works across machines.
- tensor (`sync_weights_from_tensor`, colocated): every sending rank packs its tensors into flattened buckets
  of `bucket_bytes` and posts them as shared-memory handles (SGLang's `MultiprocessingSerializer`) to
  `/update_weights_from_tensor`, inside a `/begin_weight_update` ... `/end_weight_update` session that global
  rank 0 opens and closes, then sets the version. The server must run on the same machine as the sender.
- distributed (`DistributedWeightSync`): the sender of each stage joins a process group with every server rank
  and broadcasts bucket after bucket (`/update_weights_from_distributed`), in the same session. NCCL across
  GPU machines, gloo on CPU; no shared file system or shared memory needed.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gvpo.megatron.parallel import ParallelContext
from megatron_gvpo.megatron.weights import global_named_parameters
from megatron_gvpo.models.arch import Arch
from megatron_gvpo.models.hf_io import SafetensorsStreamWriter, copy_hf_assets
from megatron_gvpo.models.hf_maps import megatron_to_hf
from megatron_gvpo.models.sharding import is_expert, tp_split, unshard
from megatron_gvpo.rollout.base import RolloutError

_EXPERT_INDEX = re.compile(r"(\.local_experts\.)(\d+)\.")


def _parameters(chunks: list) -> list[tuple[str, torch.Tensor]]:
    return [(name, p) for chunk in chunks for name, p in global_named_parameters(chunk)]


def _full_shape(name: str, local: torch.Size, ctx: ParallelContext) -> tuple[int, ...]:
    dim = tp_split(name).dim
    shape = list(local)
    if dim is not None:
        shape[dim] *= ctx.etp_size if is_expert(name) else ctx.tp_size
    return tuple(shape)


def _expert_names(name: str, arch: Arch, ctx: ParallelContext) -> list[str]:
    """The global names of local expert `name` on every EP rank, in EP rank order (this rank's index is
    ep_rank * local experts + j)."""
    local = arch.num_experts // ctx.ep_size
    j = int(_EXPERT_INDEX.search(name).group(2)) - ctx.ep_rank * local
    return [_EXPERT_INDEX.sub(rf"\g<1>{r * local + j}.", name) for r in range(ctx.ep_size)]


def hf_plan(chunks: list, arch: Arch, ctx: ParallelContext, padded_vocab: int, dtype: torch.dtype):
    """[(HF name, shape, dtype)] of what `hf_tensors` yields on this rank, from meta tensors (no data)."""
    plan = []
    for name, p in _parameters(chunks):  # the order in which hf_tensors yields them
        meta = torch.empty(_full_shape(name, p.shape, ctx), dtype=p.dtype, device="meta")
        for full_name in _expert_names(name, arch, ctx) if is_expert(name) else [name]:
            plan += [(n, tuple(t.shape), dtype) for n, t in _hf_from_full(arch, {full_name: meta}, padded_vocab)]
    return plan


def _hf_from_full(arch: Arch, full: dict[str, torch.Tensor], padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    # A tied model's last stage holds a copy of the embedding as output_layer: not an HF tensor of its own.
    yield from megatron_to_hf(arch, full, padded_vocab, only=set(full))


@torch.no_grad()
def hf_tensors(chunks: list, arch: Arch, ctx: ParallelContext, padded_vocab: int,
               dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of this rank's pipeline stage (module docstring), yielded on the sender; collective
    over TP (and over expert TP and EP for the experts): every rank with `_takes_part` must drain it."""
    for name, param in _parameters(chunks):
        local = param.detach().contiguous()
        if not is_expert(name):
            if ctx.dp_rank != 0:
                continue
            full = {name: unshard(name, _all_gather(local, ctx.tp_group, ctx.tp_size))}
        else:
            whole = unshard(name, _all_gather(local, ctx.etp_group, ctx.etp_size))
            full = dict(zip(_expert_names(name, arch, ctx), _all_gather(whole, ctx.ep_group, ctx.ep_size), strict=True))
        if not _sender(ctx):
            continue
        for hf_name, tensor in _hf_from_full(arch, full, padded_vocab):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _all_gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t, group=group)
    return out


def _sender(ctx: ParallelContext) -> bool:
    return ctx.tp_rank == 0 and ctx.dp_rank == 0


def _takes_part(ctx: ParallelContext) -> bool:
    """The ranks that gather a stage's tensors: data-parallel rank 0 (every TP rank of it) and, for the
    experts, expert-data-parallel rank 0 (every expert-TP and EP rank of it)."""
    return ctx.dp_rank == 0 or ctx.edp_rank == 0


def write_hf_checkpoint(chunks: list, arch: Arch, ctx: ParallelContext, padded_vocab: int, directory: str | Path,
                        hf_assets: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Collective over the whole world: the trainer's current weights as an HF model directory."""
    directory = Path(directory)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    dist.barrier()
    file = f"model-stage{ctx.pp_rank:03d}.safetensors"
    plan = hf_plan(chunks, arch, ctx, padded_vocab, dtype) if _sender(ctx) else []
    if _takes_part(ctx):
        writer = SafetensorsStreamWriter(directory, plan, max_shard_bytes=0, single_file=file) if plan else None
        for name, tensor in hf_tensors(chunks, arch, ctx, padded_vocab, dtype):  # yields on the sender only
            writer.write(name, tensor)
        if writer is not None:
            writer.close()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {name: file for name, _, _ in plan})
    if rank == 0:
        weight_map = {name: f for stage in gathered for name, f in stage.items()}
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        copy_hf_assets(Path(hf_assets), directory)
    dist.barrier()
    return directory


def sync_weights_from_disk(chunks: list, arch: Arch, ctx: ParallelContext, padded_vocab: int, urls: list[str],
                           directory: str | Path, hf_assets: str | Path, version: str,
                           dtype: torch.dtype = torch.float32, timeout_s: float = 600.0) -> None:
    """Collective: write the weights (`write_hf_checkpoint`) and load them into every server as `version`."""
    path = write_hf_checkpoint(chunks, arch, ctx, padded_vocab, directory, hf_assets, dtype)
    error = None
    if dist.get_rank() == 0:
        request = {"model_path": str(path), "weight_version": version, "flush_cache": True}
        error = next((e for u in urls if (e := _post_ok(u, "/update_weights_from_disk", request, timeout_s))), None)
    _raise_if_any(error)


def _post_ok(url: str, route: str, payload: dict, timeout_s: float) -> str | None:
    """None on success, else the error message."""
    import urllib.error

    from megatron_gvpo.rollout.http import request_json

    try:
        answer = request_json(f"{url}{route}", payload, timeout_s)
    except urllib.error.HTTPError as e:
        return f"{url}{route}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}"
    except (urllib.error.URLError, OSError) as e:
        return f"{url}{route}: {e}"
    if isinstance(answer, dict) and answer.get("success", True) is False:
        return f"{url}{route}: {answer.get('message')}"
    return None


def _raise_if_any(error: str | None) -> None:
    """Collective: every rank raises if any rank hit an error."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise RolloutError(first)


@contextlib.contextmanager
def _weight_update_session(urls: list[str], version: str, timeout_s: float):
    """Collective: the body runs inside `/begin_weight_update` ... `/end_weight_update` on every server (global
    rank 0 opens and closes it); then the servers take `version`. An error anywhere raises on every rank."""
    error = None
    if dist.get_rank() == 0:
        error = next((e for u in urls if (e := _post_ok(u, "/begin_weight_update", {}, timeout_s))), None)
    _raise_if_any(error)
    yield
    if dist.get_rank() == 0:
        for u in urls:
            error = error or _post_ok(u, "/end_weight_update", {}, timeout_s)
            # SGLang aborts every request in flight on a version change unless told not to; paused requests
            # (asynchronous rollout) continue under the new weights.
            error = error or _post_ok(u, "/update_weight_version", {"new_version": version,
                                                                    "abort_all_requests": False}, timeout_s)
    _raise_if_any(error)


def _buckets(named: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int):
    """(bucket, is_last) of consecutive tensors of about `bucket_bytes`; drains `named` (a collective)."""
    bucket, size = [], 0
    for name, tensor in named:
        bucket.append((name, tensor))
        size += tensor.nbytes
        if size >= bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
    if bucket:
        yield bucket, True


def _server_tps(urls: list[str], timeout_s: float) -> tuple[list[int], str | None]:
    """Ranks of each server (its TP size: each rank needs its own copy of a tensor payload or its own group
    rank), or the error that prevented asking."""
    import urllib.error

    from megatron_gvpo.rollout.http import request_json

    tps = []
    for url in urls:
        try:
            info = request_json(f"{url}/server_info", None, timeout_s)
        except (urllib.error.URLError, OSError) as e:
            return [], f"{url}/server_info: {e}"
        tps.append(int(info.get("tp_size", 1)) if isinstance(info, dict) else 1)
    return tps, None


@contextlib.contextmanager
def _shareable_by_name():
    """Serialise CPU tensors as named shared-memory files. torch's default ('file_descriptor') hands the fd over
    through multiprocessing's resource sharer, which authenticates with the sender's multiprocessing authkey:
    an SGLang server started as a separate program has another one and rejects it. CUDA tensors travel as
    CUDA IPC handles either way."""
    import torch.multiprocessing as tmp

    previous = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        tmp.set_sharing_strategy(previous)


def sync_weights_from_tensor(chunks: list, arch: Arch, ctx: ParallelContext, padded_vocab: int, urls: list[str],
                             version: str, dtype: torch.dtype = torch.float32, bucket_bytes: int = 32 << 20,
                             timeout_s: float = 600.0) -> None:
    """Collective: the weights into every (colocated) server through shared memory, as `version`."""
    try:
        from sglang.srt.utils.common import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError as e:
        raise RolloutError("sync_weights_from_tensor needs sglang installed next to the trainer "
                           "(tools/setup_venv.sh); use sync_weights_from_disk otherwise") from e

    def post(bucket: list, last: bool) -> str | None:
        b = FlattenedTensorBucket(named_tensors=bucket)
        with _shareable_by_name():
            payload = MultiprocessingSerializer.serialize(
                {"flattened_tensor": b.get_flattened_tensor(), "metadata": b.get_metadata()}, output_str=True)
        errors = (_post_ok(u, "/update_weights_from_tensor", {
            "serialized_named_tensors": [payload] * tp, "load_format": "flattened_bucket",
            "flush_cache": last,  # the prefix cache holds KV of the old weights
        }, timeout_s) for u, tp in zip(urls, server_tp, strict=True))
        return next((e for e in errors if e), None)

    with _weight_update_session(urls, version, timeout_s):
        error = None
        if _takes_part(ctx):
            server_tp, error = _server_tps(urls, timeout_s) if _sender(ctx) else ([], None)
            for bucket, last in _buckets(hf_tensors(chunks, arch, ctx, padded_vocab, dtype), bucket_bytes):
                error = error or post(bucket, last)  # TP peers keep draining hf_tensors: it is a collective
        _raise_if_any(error)


class DistributedWeightSync:
    """Weights over a process group that the sender and every server rank join (SGLang's
    `update_weights_from_distributed`: NCCL between GPUs across machines, gloo on CPU).

    Each pipeline stage's sender (TP rank 0, DP rank 0) has its own group with all servers, named
    `{group_prefix}_pp{stage}`, rank 0 the sender and the servers' ranks after it. Per bucket the sender posts
    the names, dtypes and shapes to every server and broadcasts the tensors one by one while the servers
    receive them (no flattening copy). Stages take turns: a server handles one weight request at a time, so
    two stages sending to two servers at once could each wait for the server the other holds.

    `connect()` creates the groups (collective over the trainer; once per run, again after a server restart),
    `sync(chunks, version)` moves the weights, `close()` destroys the groups on both sides.
    """

    def __init__(self, arch: Arch, ctx: ParallelContext, padded_vocab: int, urls: list[str],
                 dtype: torch.dtype = torch.float32, bucket_bytes: int = 256 << 20, timeout_s: float = 600.0,
                 backend: str | None = None, group_prefix: str = "megatron_gvpo"):
        self.arch, self.ctx, self.padded_vocab, self.urls = arch, ctx, padded_vocab, list(urls)
        self.dtype, self.bucket_bytes, self.timeout_s = dtype, bucket_bytes, timeout_s
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group_name = f"{group_prefix}_pp{ctx.pp_rank}"
        self.group = None

    def _stage_by_stage(self, work) -> None:
        """Collective: `work()` on the sender of each pipeline stage in turn; errors raise on every rank."""
        for stage in range(self.ctx.pp_size):
            error = None
            if self.ctx.pp_rank == stage and _takes_part(self.ctx):
                try:
                    error = work()
                except Exception as e:  # noqa: BLE001 - raised on every rank, not just here
                    error = f"{self.group_name}: {type(e).__name__}: {e}"
            _raise_if_any(error)

    def _with_servers(self, route: str, payloads: list[dict], local) -> str | None:
        """POST payloads[i] to server i while `local()` runs here (the two sides of one rendezvous or
        broadcast); the first error of either."""
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = [pool.submit(_post_ok, u, route, p, self.timeout_s)
                       for u, p in zip(self.urls, payloads, strict=True)]
            try:
                local()
                error = None
            except Exception as e:  # noqa: BLE001 - reported with the servers' answers, on every rank
                error = f"{self.group_name}: {route} on the trainer side: {e}"
            answers = [f.result() for f in futures]
        return next((e for e in answers if e), None) or error

    def connect(self) -> None:
        from megatron_gvpo.utils.distributed import free_port, routable_address

        try:
            from sglang.srt.utils.common import init_custom_process_group
        except ImportError as e:
            raise RolloutError("DistributedWeightSync needs sglang installed next to the trainer "
                               "(tools/setup_venv.sh); use sync_weights_from_disk otherwise") from e

        def join() -> str | None:
            if not _sender(self.ctx):
                return None
            server_tp, error = _server_tps(self.urls, self.timeout_s)
            if error:
                return error
            address = routable_address(urllib.parse.urlparse(self.urls[0]).hostname)
            port = free_port("" if address != "127.0.0.1" else address)
            world = 1 + sum(server_tp)
            payloads = [{"master_address": address, "master_port": port, "rank_offset": 1 + sum(server_tp[:i]),
                         "world_size": world, "group_name": self.group_name, "backend": self.backend}
                        for i in range(len(self.urls))]

            def rendezvous():
                # The trainer hosts the group's store itself: under torchrun (TORCHELASTIC_USE_AGENT_STORE) a
                # tcp:// rendezvous makes even rank 0 a client of a store it expects torchrun's agent to host at
                # that address, and both sides then wait out the timeout. The servers' side (tcp://, rank > 0)
                # prefixes the store with the group's name, as this does.
                timeout = timedelta(seconds=self.timeout_s)
                store = dist.TCPStore(address, port, world, is_master=True, timeout=timeout)
                self.group = init_custom_process_group(
                    backend=self.backend, store=dist.PrefixStore(self.group_name, store), world_size=world, rank=0,
                    group_name=self.group_name, timeout=timeout)

            return self._with_servers("/init_weights_update_group", payloads, rendezvous)

        self._stage_by_stage(join)

    def sync(self, chunks: list, version: str) -> None:
        """Collective: the trainer's weights into every server, as `version`."""
        if _sender(self.ctx) and self.group is None:
            raise RolloutError("DistributedWeightSync.sync before connect()")

        def send() -> str | None:
            error = None
            named = hf_tensors(chunks, self.arch, self.ctx, self.padded_vocab, self.dtype)
            for bucket, last in _buckets(named, self.bucket_bytes):  # TP peers drain hf_tensors too: a collective
                if error is None:
                    error = self._send(bucket, last)
            return error

        with _weight_update_session(self.urls, version, self.timeout_s):
            self._stage_by_stage(send)

    def _send(self, bucket: list, last: bool) -> str | None:
        payload = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                   "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                   "flush_cache": last}

        def broadcast():
            handles = [dist.broadcast(t, group=self.group, group_src=0, async_op=True) for _, t in bucket]
            for h in handles:
                h.wait()

        return self._with_servers("/update_weights_from_distributed", [payload] * len(self.urls), broadcast)

    def close(self) -> None:
        """Collective: destroy the groups (servers first, so none waits on a vanished peer)."""

        def leave() -> str | None:
            if self.group is None:
                return None
            payload = {"group_name": self.group_name}
            errors = [_post_ok(u, "/destroy_weights_update_group", payload, self.timeout_s) for u in self.urls]
            dist.destroy_process_group(self.group)
            self.group = None
            return next((e for e in errors if e), None)

        self._stage_by_stage(leave)
