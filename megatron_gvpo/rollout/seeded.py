"""Seeded sampling on SGLang servers without deterministic inference (the CPU path), through its custom logit
processor API.

SGLang honours per-request sampling seeds only with --enable-deterministic-inference, which needs a GPU
attention backend. Without it a sample depends on the server's RNG stream, i.e. on every request the server
served before, so a resumed run cannot draw what the uninterrupted one drew. `SeededGumbel` makes each token
an exact draw from softmax(logits / T) that depends only on (seed, position): Gumbel-max,
argmax(log_softmax(logits / T) + G), with G drawn from a generator seeded by hash((seed, position)). It returns
logits whose only finite entry is that token, and the request is sent greedy (temperature 0), so the server
emits it. A sample is then a function of the weights, the prompt and the seed alone.

The price: SGLang computes the log-probs it returns from the rewritten logits, so the client reports NaN for
them (GVPO recomputes every log-prob in the trainer and never reads them). top_p / top_k are not applied.

The server must run with --enable-custom-logit-processor and --disable-overlap-schedule (with overlap, the
request's output_ids, which give the position, lag one token behind; measured) and import this module
(`SGLangServerConfig.custom_logit_processor` does all three): the processor travels by reference.
"""

from __future__ import annotations

import json

import torch

try:
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor
except ImportError:  # the client side only needs `processor_string`; servers always have sglang
    CustomLogitProcessor = object


def generator_seed(seed: int, position: int) -> int:
    """The noise generator's seed for one token: Python's hash of int tuples is the same in every process
    (PYTHONHASHSEED randomises str and bytes only)."""
    return hash((seed, position)) & 0x7FFF_FFFF_FFFF_FFFF


def gumbel_max(logits: torch.Tensor, seeds: list[int], positions: list[int], temperatures: list[float]) -> torch.Tensor:
    """[B] token ids: row b drawn from softmax(logits[b] / temperatures[b]) with noise fixed by (seed, position)."""
    logp = torch.log_softmax(logits.double() / torch.tensor(temperatures, dtype=torch.float64,
                                                             device=logits.device)[:, None], dim=-1)
    noise = torch.empty_like(logp)
    for row, (seed, position) in enumerate(zip(seeds, positions, strict=True)):
        generator = torch.Generator(device=logits.device).manual_seed(generator_seed(seed, position))
        noise[row].uniform_(generator=generator)
    return (logp - (-noise.log()).log()).argmax(dim=-1)  # Gumbel(0, 1) = -log(-log(U))


class SeededGumbel(CustomLogitProcessor):
    """The custom logit processor (module docstring). custom_params per request: {"seed", "temperature"}."""

    def __call__(self, logits: torch.Tensor, custom_param_list=None) -> torch.Tensor:
        params = custom_param_list or []
        tokens = gumbel_max(logits, [p["seed"] for p in params], [len(p["__req__"].output_ids) for p in params],
                            [p["temperature"] for p in params])
        out = torch.full_like(logits, float("-inf"))
        out.scatter_(1, tokens[:, None], 0.0)
        return out


def processor_string() -> str:
    """SeededGumbel as the `custom_logit_processor` field of a /generate request (SGLang's `to_str` format)."""
    import dill

    return json.dumps({"callable": dill.dumps(SeededGumbel).hex()})
