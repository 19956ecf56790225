"""Contract of the data front door (megatron_gvpo/data/prompts.py, chat.py, records.py; rewards by source).

- Every supported prompt format (verl's RL parquet, messages JSONL, this project's prompt/label JSONL with
  `prompts.chat_template`, a `datasets` save_to_disk directory, a JSON array, several files by glob and list)
  gives the token ids `tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`
  gives when called directly: the independent reference is transformers' own template code.
- The template options (a system prompt, a jinja file replacing the tokenizer's template, template keyword
  arguments) change the ids exactly as the same arguments to apply_chat_template do.
- Bad rows (a message without a role, an empty conversation, a missing label where the reward needs one, a
  prompt over the limit) fail naming the file, the row and the field, or are counted and skipped.
- Offline group data takes prompts as messages too, rendered the same way.
- Rewards are chosen per data source; truncated samples are kept, zeroed or dropped with their group.
"""

import json
from pathlib import Path

import pytest

from megatron_gvpo.data.chat import PromptEncoder
from megatron_gvpo.data.offline import OfflineDataConfig, load_groups
from megatron_gvpo.data.prompts import PromptDataConfig, load_prompts
from megatron_gvpo.models.hf_io import eos_token_ids
from megatron_gvpo.rewards.scoring import RewardConfig, score
from megatron_gvpo.rollout.single_turn import treat_truncated

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are helpful."
    "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
    "enable_thinking %}<think></think>\n{% endif %}{% endif %}"
)
QUESTIONS = ["What is 6 times 7?", "Natalia sold 48 clips in April and half as many in May. How many in total?",
             "Compute 1/2 + 1/4."]
ANSWERS = ["42", "72", "\\frac{3}{4}"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A BPE tokenizer trained here, with ChatML special tokens and a ChatML template (SmolLM2 / Qwen style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = QUESTIONS * 20 + ["system user assistant You are helpful. think"] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", unk_token="<unk>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(out)
    return tok


def reference_ids(tok, messages, **kwargs) -> tuple[int, ...]:
    """What transformers' apply_chat_template gives when called directly."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return tuple(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def user(text):
    return [{"role": "user", "content": text}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def verl_rows():
    return [{"data_source": "openai/gsm8k", "prompt": user(q), "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"split": "train", "index": i}}
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))]


def cfg(**kw) -> PromptDataConfig:
    return PromptDataConfig(max_prompt_tokens=256, **kw)


def test_every_format_gives_the_ids_of_apply_chat_template(tmp_path, tok):
    import datasets

    want = [reference_ids(tok, user(q)) for q in QUESTIONS]
    verl = tmp_path / "verl.parquet"
    datasets.Dataset.from_list(verl_rows()).to_parquet(str(verl))
    messages = write_jsonl(tmp_path / "messages.jsonl", [{"messages": user(q) + [{"role": "assistant", "content": a}]}
                                                         for q, a in zip(QUESTIONS, ANSWERS, strict=True)])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": q, "label": a} for q, a in zip(QUESTIONS, ANSWERS,
                                                                                            strict=True)])
    arrow = tmp_path / "arrow_dir"
    datasets.Dataset.from_list(verl_rows()).save_to_disk(str(arrow))
    array = tmp_path / "array.json"
    array.write_text(json.dumps(verl_rows()))
    sources = {"verl parquet": (verl, cfg()), "messages jsonl": (messages, cfg()),
               "prompt/label jsonl": (plain, cfg(chat_template=True)), "arrow directory": (arrow, cfg()),
               "json array": (array, cfg())}
    for name, (path, c) in sources.items():
        prompts, stats = load_prompts(path, c, tok, vocab_size=len(tok), needs_label=lambda s: True)
        assert [p.ids for p in prompts] == want, name
        assert [p.label for p in prompts] == ANSWERS, name  # verl's ground truth; the final assistant turn
        assert stats.kept == 3 and stats.skipped == 0, name
        assert prompts[0].text == tok.apply_chat_template(user(QUESTIONS[0]), add_generation_prompt=True,
                                                          tokenize=False), name
    prompts, _ = load_prompts(verl, cfg(), tok)
    assert {p.data_source for p in prompts} == {"openai/gsm8k"} and prompts[1].source == f"{verl}[1]"
    # Several files: a list and a glob (sorted matches), read in order.
    prompts, stats = load_prompts([str(verl), str(tmp_path / "m*.jsonl")], cfg(), tok)
    assert [p.ids for p in prompts] == want + want and stats.rows == 6
    assert prompts[4].source == f"{messages}:2"


def test_template_options_match_apply_chat_template_with_the_same_arguments(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": user(QUESTIONS[0])}])
    system = [{"role": "system", "content": "Reason step by step."}]
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    cases = [
        (cfg(system_prompt="Reason step by step."), reference_ids(tok, system + user(QUESTIONS[0]))),
        (cfg(chat_template_path=str(jinja)), reference_ids(tok, user(QUESTIONS[0]), chat_template=jinja.read_text())),
        (cfg(chat_template_kwargs={"enable_thinking": False}),
         reference_ids(tok, user(QUESTIONS[0]), enable_thinking=False)),
    ]
    default = reference_ids(tok, user(QUESTIONS[0]))
    for c, want in cases:
        (prompt,), _ = load_prompts(path, c, tok)
        assert prompt.ids == want and want != default
    # A conversation that has its own system message keeps it.
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}] +
                                               user(QUESTIONS[0])}])
    (prompt,), _ = load_prompts(path, cfg(system_prompt="Reason step by step."), tok)
    assert prompt.ids == reference_ids(tok, [{"role": "system", "content": "Be brief."}] + user(QUESTIONS[0]))


def test_a_field_mapping_reads_other_layouts(tmp_path, tok):
    """GSM8K's own columns (question / answer) and a nested label, through prompts.prompt_key / label_key."""
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": q, "answer": f"... #### {a}", "meta": {"src": "x"}}
                                                  for q, a in zip(QUESTIONS, ANSWERS, strict=True)])
    prompts, _ = load_prompts(path, cfg(prompt_key="question", label_key="answer", data_source_key="meta.src",
                                        chat_template=True), tok)
    assert [p.ids for p in prompts] == [reference_ids(tok, user(q)) for q in QUESTIONS]
    assert prompts[0].label == "... #### 42" and prompts[0].data_source == "x"
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl:1: query: missing \(prompts\.prompt_key\)"):
        load_prompts(path, cfg(prompt_key="query"), tok)
    # Without the chat template a text prompt is tokenized as it is (base models, the toy task).
    prompts, _ = load_prompts(path, cfg(prompt_key="question", prompt_add_special_tokens=False), tok)
    assert prompts[0].ids == tuple(tok.encode(QUESTIONS[0], add_special_tokens=False))


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"content": "hi"}]}, r"messages\[0\]\.role: missing"),
    ({"messages": []}, r"messages: an empty conversation"),
    ({"prompt": [{"role": "user", "content": 3}]}, r"prompt\[0\]\.content: expected a string, got int"),
    ({"prompt": user("What is 6 times 7?")}, r"label: missing, and this row's reward needs one"),
    ({"prompt": user("What is 6 times 7? " * 40), "label": "1"}, r"prompt: \d+ tokens > prompts\.max_prompt_tokens=64"),
    ({"data_source": "s", "prompt": 5}, r"prompt: expected a string or a list of messages, got int"),
])
def test_bad_rows_name_file_row_and_field_or_are_skipped(tmp_path, tok, row, message):
    good = {"prompt": user(QUESTIONS[0]), "label": "42"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, row])
    needs = RewardConfig(kind="math").needs_label
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: {message}"):
        load_prompts(path, PromptDataConfig(), tok, vocab_size=len(tok), needs_label=needs)
    prompts, stats = load_prompts(path, PromptDataConfig(on_bad_row="skip"), tok, vocab_size=len(tok),
                                  needs_label=needs)
    assert len(prompts) == 1 and stats.skipped == 1 and "p.jsonl:2" in stats.first_error


def test_a_parquet_row_error_names_its_index(tmp_path, tok):
    import datasets

    rows = verl_rows()
    rows[2]["prompt"] = [{"role": "", "content": "x"}]
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"bad\.parquet\[2\]: prompt\[0\]\.role: expected a non-empty string"):
        load_prompts(path, cfg(), tok)


def test_missing_sources_and_templates_fail_before_any_row(tmp_path, tok):
    with pytest.raises(ValueError, match=r"prompts\.path: .*nothing\.parquet' does not exist"):
        load_prompts(tmp_path / "nothing.parquet", cfg(), tok)
    with pytest.raises(ValueError, match=r"prompts\.path: the pattern .* matches no file"):
        load_prompts(str(tmp_path / "none-*.parquet"), cfg(), tok)
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": user("hi")}])
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    assert not plain.chat_template
    with pytest.raises(ValueError, match=r"the tokenizer has none: set prompts\.chat_template_path"):
        load_prompts(path, cfg(on_bad_row="skip"), plain)


def test_offline_groups_take_prompts_as_messages(tmp_path, tok):
    rows = [{"prompt": user(q), "responses": [{"text": a, "reward": 1.0}, {"text": "no", "reward": 0.0}]}
            for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    path = write_jsonl(tmp_path / "groups.jsonl", rows)
    encoder = PromptEncoder(tok, cfg(), len(tok))
    groups, stats = load_groups(OfflineDataConfig(path=str(path)), tok, len(tok), prompt_encoder=encoder)
    assert [g.prompt_ids for g in groups] == [reference_ids(tok, user(q)) for q in QUESTIONS]
    assert groups[0].response_ids[0][-1] == tok.eos_token_id  # responses still end with EOS
    with pytest.raises(ValueError, match=r"groups\.jsonl:1: a prompt given as messages needs the chat template"):
        load_groups(OfflineDataConfig(path=str(path)), tok, len(tok))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"content": "x"}], "responses": rows[0]["responses"]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: prompt\[0\]\.role: missing"):
        load_groups(OfflineDataConfig(path=str(bad)), tok, len(tok), prompt_encoder=encoder)


def length_reward(prompt, response, label):
    return float(len(response))


def test_rewards_are_chosen_per_data_source():
    rc = RewardConfig(kind="math", by_source={"lengths": "tests.test_prompt_formats:length_reward",
                                              "toy": "addition"})
    rc.validate()
    responses = ["so it is \\boxed{42}", "#### 72", "The answer is 3/4", "abcd", "046"]
    labels = ["42", "72", "\\frac{3}{4}", None, None]
    sources = ["openai/gsm8k", "", "lighteval/MATH", "lengths", "toy"]
    result = score(["q"] * 4 + ["12+34="], responses, labels, range(5), rc, sources=sources)
    assert result.rewards == [1.0, 1.0, 1.0, 4.0, 1.0] and not result.errors
    assert rc.needs_label("openai/gsm8k") and not rc.needs_label("lengths") and not rc.needs_label("toy")
    with pytest.raises(ValueError, match=r"reward\.by_source\.x must be 'math', 'http', 'addition' or a function"):
        RewardConfig(by_source={"x": "nonsense"}).validate()


@pytest.mark.parametrize("policy, rewards, dropped", [
    ("keep", [1.0, 1.0, 0.0, 1.0], set()), ("zero", [0.0, 1.0, 0.0, 0.0], set()), ("drop_group", [1.0, 1.0, 0.0, 1.0],
                                                                                   {0, 1})])
def test_truncated_samples_are_kept_zeroed_or_dropped(policy, rewards, dropped):
    got = [1.0, 1.0, 0.0, 1.0]  # groups of 2: samples 0 and 3 were cut at max_new_tokens
    assert treat_truncated(got, [0, 3], 2, policy) == dropped and got == rewards


def test_stop_ids_come_from_the_generation_config(tmp_path, tok):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    assert eos_token_ids(tmp_path, tok) == (3, 1)  # Qwen2.5-style: end of turn first, then end of text
    (tmp_path / "generation_config.json").unlink()
    assert eos_token_ids(tmp_path, tok) == (1, tok.eos_token_id) == (1, 3)
    assert eos_token_ids(tmp_path / "config.json") == (1,)
