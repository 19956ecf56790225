"""Run megatron-core 0.16.1 on a CPU-only PyTorch (development and CI machines; production is CUDA).

`apply_cpu_compat()` does nothing and returns False when `torch.cuda.is_available()`: on a GPU every
Megatron code path stays untouched. Without CUDA it applies five groups of patches once per process and
returns True. It may be called before or after `import megatron.core` (it imports the one Megatron module
it patches itself). `CPU_TRANSFORMER_CONFIG` holds the `TransformerConfig` keyword values Megatron needs on
CPU (fusions off, CPU initialisation, unbatched pipeline p2p for gloo); the model provider merges it in
when CUDA is absent.

Why each group exists:

1. RNG. Megatron seeds and forks "the CUDA generator" (`model_parallel_cuda_manual_seed`, the
   `CudaRNGStatesTracker` behind tensor-parallel init and dropout). A CPU build raises on
   `torch.cuda.get_rng_state`, and `tensor_parallel.random._set_cuda_rng_state` goes through
   `torch.cuda._lazy_call`, which on a machine that never initialises CUDA queues the callback forever:
   a silent no-op that would make every fork share one stream. All of them are routed to the CPU generator.
   Consequence: Megatron's "CUDA" generator and torch's CPU generator are one generator here, so
   `model_parallel_cuda_manual_seed(seed)` also reseeds the CPU generator (it does not on a GPU).
2. Device API. Schedules, the DDP grad buffers and the optimizers call `torch.cuda.current_device`,
   `synchronize`, `Stream`, `Event`, `current_stream`, `stream(...)` and `Tensor.cuda()` for bookkeeping
   only. On CPU they become the cpu device, no-ops and identity: CPU kernels run synchronously on the
   calling thread, so there is nothing to order or wait for.
3. `device="cuda"` literals. Dozens of megatron.core call sites create tensors on the literal "cuda" (on
   the paths our tests run: the default causal mask in transformer/utils.py, the schedules' token
   counter, the optimizers' found-inf / scale / overflow tensors, clip_grads' norm buffers; elsewhere the
   grad scaler, utils, ...). A `torch.overrides.TorchFunctionMode` rewrites the `device=` argument of any
   torch call that names a cuda device, and the target device of `Tensor.to`, to cpu. Why a mode rather
   than per-module proxies of `torch`: a proxy has to be installed in each Megatron module that holds such
   a literal, by name, and silently misses the next release's new call site or a `from torch import
   zeros`; the mode sees every torch call wherever it comes from, so a version bump keeps working, or
   fails loudly in a genuinely CUDA-only call. Cost and scope: about 1 us of Python per torch call
   (measured: 0.96 -> 1.91 us for a tiny `add`), nothing next to a CPU training step; torch function
   modes are thread-local, so the redirect is active on every thread that called `apply_cpu_compat()`
   (call it once on any other thread that runs Megatron code; the dist_checkpointing I/O threads and
   helper processes create no cuda tensors). `torch.device("cuda")` objects themselves are left as they
   are: only allocations and moves are redirected.
4. `Tensor.type()`. The optimizer, the distributed optimizer and grad clipping classify parameters by
   comparing `param.type()` with 'torch.cuda.FloatTensor' / 'torch.cuda.HalfTensor' /
   'torch.cuda.BFloat16Tensor' and reject anything else. Only argument-less calls made directly from a
   `megatron.core.optimizer` module get the cuda-style name; every other caller sees the true type.

5. Mixture of experts. Megatron's router calls `moe_utils.te_general_gemm`, which is only defined when
   Transformer Engine imports (the name is missing, not None, so the unfused fallback raises NameError; this
   is true on a GPU without TE as well, so `patch_moe_without_te` is also called by the model provider). The
   all-to-all dispatcher asks `maybe_move_tensor_to_cpu(..., as_numpy=True)` for its split sizes and gets
   them as numpy arrays only from a CUDA tensor; a CPU tensor comes back as a tensor and the dispatcher's
   numpy arithmetic on it fails at EP > 1. CPU tensors are converted too. Under TP (with sequence
   parallelism) the dispatcher all-gathers and reduce-scatters token blocks of different sizes per TP rank
   (`output_split_sizes` / `input_split_sizes` of tensor_parallel.mappings); NCCL takes uneven blocks, gloo
   does not, so those two calls pad every block to the largest, run the even collective and trim.

Not covered (they fail on CPU with or without this layer): Transformer Engine and Apex kernels, the
fusions switched off in `CPU_TRANSFORMER_CONFIG`, `sequence_parallel=True` (torch LayerNorm refuses it
without apex/TE), CUDA graphs, NCCL-only features (userbuffers, symmetric memory, the NCCL allocator).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_gvpo.utils.logging import silence_known_notices

# Megatron's fused kernels need CUDA (or apex/TE); the unfused paths give the same numbers.
CPU_TRANSFORMER_CONFIG: dict[str, object] = {
    "use_cpu_initialization": True,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "masked_softmax_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
    "bias_activation_fusion": False,
    "cross_entropy_loss_fusion": False,
    "fused_single_qkv_rope": False,
    # CPU means gloo, and gloo's batched isend/irecv swaps messages to the same peer: the interleaved
    # schedule at PP=2 then gives silently wrong gradients. Unbatched p2p is correct for every schedule.
    "batch_p2p_comm": False,
}

# Modules whose `param.type()` string comparisons assume CUDA tensors (group 4).
_CUDA_TYPE_NAME_CALLERS: tuple[str, ...] = ("megatron.core.optimizer",)

_CPU = torch.device("cpu")
_lock = threading.Lock()
_patched = False
_thread_state = threading.local()


def apply_cpu_compat() -> bool:
    """Make megatron-core run on a CPU-only torch; see the module docstring.

    Returns False (and changes nothing) when CUDA is available, True otherwise. Idempotent.
    """
    if torch.cuda.is_available():
        return False
    global _patched
    with _lock:
        if not _patched:
            _patch_rng()
            _patch_device_api()
            _patch_recompute_backward()
            _patch_tensor_type()
            patch_moe_without_te()
            _patch_moe_split_sizes()
            _patch_uneven_sequence_parallel_collectives()
            silence_known_notices(cpu=True)  # CUDA-only advice, such as CUDA_DEVICE_MAX_CONNECTIONS under TP
            _patched = True
    _enter_device_redirect_on_this_thread()
    return True


# --- group 1: RNG ------------------------------------------------------------------------------------


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_rng() -> None:
    import megatron.core.tensor_parallel.random as mcore_random

    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed
    # _get_cuda_rng_state(graph_safe=False) reads torch.cuda.random.get_rng_state, not torch.cuda's alias.
    torch.cuda.random.get_rng_state = _cpu_get_rng_state
    torch.cuda.random.set_rng_state = _cpu_set_rng_state
    torch.cuda.random.manual_seed = _cpu_manual_seed
    # Megatron looks these up as module globals at call time, so replacing the attributes suffices.
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state


# --- group 2: device API -----------------------------------------------------------------------------


class _NullEvent:
    """Stands in for torch.cuda.Event: CPU work is already complete when the Python call returns."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU kernels run in order on the calling thread."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_DEFAULT_STREAM = _NullStream()


def _noop(*args: Any, **kwargs: Any) -> None:
    pass


def _tensor_cuda_identity(
    self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any
) -> torch.Tensor:
    return self


def _current_device() -> torch.device:
    # A device object, not an index: Megatron passes it straight to `device=`, where an int means cuda:N.
    return _CPU


def _current_stream(device: Any = None) -> _NullStream:
    return _DEFAULT_STREAM


def _stream_context(stream: Any = None) -> contextlib.nullcontext:
    return contextlib.nullcontext(stream)


def _patch_device_api() -> None:
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _noop
    torch.cuda.empty_cache = _noop
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = _current_stream
    torch.cuda.default_stream = _current_stream
    torch.cuda.stream = _stream_context
    torch.Tensor.cuda = _tensor_cuda_identity


# --- group 3: device="cuda" literals -----------------------------------------------------------------


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _to_cpu_if_cuda(value: Any) -> Any:
    return _CPU if _is_cuda(value) else value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites cuda `device=` arguments (and `Tensor.to`'s positional device) of every torch call to cpu."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to:
            args = tuple(_to_cpu_if_cuda(a) for a in args)
        return func(*args, **kwargs)


def _patch_recompute_backward() -> None:
    """Activation recomputation (train.recompute) runs each layer's forward again inside autograd's backward,
    where torch function modes are not active (measured: a mode entered on the thread does not see the calls a
    Function's backward makes). The recomputed forward meets the same `device="cuda"` literals (the default
    causal mask), so Megatron's CheckpointFunction.backward runs under the redirect."""
    from megatron.core.tensor_parallel import random as tp_random

    original = tp_random.CheckpointFunction.backward

    def backward(ctx, *args):
        with _CudaToCpuMode():
            return original(ctx, *args)

    tp_random.CheckpointFunction.backward = staticmethod(backward)


def _enter_device_redirect_on_this_thread() -> None:
    # Torch function modes live on a per-thread stack; enter once per thread and never exit, so the
    # redirect lasts for the life of the thread (there is no CUDA to return to).
    if getattr(_thread_state, "mode", None) is None:
        mode = _CudaToCpuMode()
        mode.__enter__()
        _thread_state.mode = mode


# --- group 4: Tensor.type() names ----------------------------------------------------------------------

_original_tensor_type = torch.Tensor.type


def _tensor_type_cuda_names_for_optimizer(
    self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
) -> Any:
    if dtype is None and not kwargs:
        name: str = _original_tensor_type(self)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith(_CUDA_TYPE_NAME_CALLERS) and name.startswith("torch.") and ".cuda." not in name:
            return "torch.cuda." + name[len("torch.") :]
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def _patch_tensor_type() -> None:
    torch.Tensor.type = _tensor_type_cuda_names_for_optimizer


def patch_moe_without_te() -> None:
    """Define `moe_utils.te_general_gemm` as None where Transformer Engine is absent (group 5), so the router
    takes its unfused path. Idempotent; no-op with TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_sequence_parallel_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def padded_blocks(blocks: list[torch.Tensor], rows: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(b, (0, 0) * (b.dim() - 1) + (0, rows - b.shape[0])) for b in blocks])

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        rows = max(output_split_sizes)
        out = gather(padded_blocks([input_], rows), group)
        return torch.cat([block[:n] for block, n in zip(out.split(rows), output_split_sizes, strict=True)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        rows = max(input_split_sizes)
        out = reduce_scatter(padded_blocks(list(input_.split(input_split_sizes)), rows), group)
        return out[: input_split_sizes[group.rank()]]

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim
