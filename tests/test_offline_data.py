"""Contract of the offline group dataset (megatron_gvpo/data/offline.py) and the addition task (data/addition.py).

Pinned: both JSONL row forms load to the same groups; every bad-input case raises ValueError naming
`path:line` and the offending field, and with on_bad_row='skip' is counted under its reason instead; the
sampler's order depends only on (seed, epoch) and resumes exactly from state_dict mid-epoch; collate builds
the batch layout of data/batch.py; the addition reward and the local tokenizer round-trip.
"""

import dataclasses
import json
import re

import pytest
import tokenizers
import torch
from transformers import AutoTokenizer

from megatron_gvpo.data import addition
from megatron_gvpo.data.batch import BEHAVIOUR_KEY, check_group_layout
from megatron_gvpo.data.groups import Group, GroupSampler, collate
from megatron_gvpo.data.offline import SKIP_REASONS, OfflineDataConfig, load_groups


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    addition.build_tokenizer(out)
    return AutoTokenizer.from_pretrained(str(out))


def _write(path, rows):
    """rows: dicts (JSON-encoded) or raw strings (written as-is)."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(path, **kw):
    return OfflineDataConfig(path=str(path), **{"max_prompt_tokens": 32, "max_response_tokens": 16, **kw})


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------


def test_text_and_ids_rows_load_to_the_same_groups(tmp_path, tok):
    eos = tok.eos_token_id
    text_rows = [
        {"prompt": "12+34=", "responses": [{"text": "046", "reward": 1}, {"text": "047", "reward": 0.0}], "id": "a"},
        {"prompt": "99+01=", "responses": [{"text": "100", "reward": 1.0}] * 3},
    ]
    ids_rows = [
        {
            "prompt_ids": _ids(tok, r["prompt"]),
            "responses": [{"ids": _ids(tok, x["text"]) + [eos], "reward": x["reward"]} for x in r["responses"]],
        }
        for r in text_rows
    ]
    text_groups, text_stats = load_groups(_cfg(_write(tmp_path / "t.jsonl", text_rows)), tok)
    ids_groups, _ = load_groups(_cfg(_write(tmp_path / "i.jsonl", ids_rows)), vocab_size=len(tok))
    assert [(g.prompt_ids, g.response_ids, g.rewards) for g in text_groups] == [
        (g.prompt_ids, g.response_ids, g.rewards) for g in ids_groups
    ]
    g0 = text_groups[0]
    assert tok.decode(list(g0.prompt_ids)) == "12+34="
    assert g0.response_ids[0][-1] == eos and tok.decode(list(g0.response_ids[0][:-1])) == "046"
    assert g0.rewards == (1.0, 0.0) and all(isinstance(r, float) for r in g0.rewards)
    assert g0.source == f"{tmp_path / 't.jsonl'}:1" and text_groups[1].source.endswith("t.jsonl:2")
    # Equal-reward groups are kept and counted.
    assert (text_stats.rows_read, text_stats.rows_kept, text_stats.responses_kept) == (2, 2, 5)
    assert text_stats.equal_reward_groups == 1 and text_stats.skipped == {}


def test_text_options_raw_tokenizer_no_eos_max_responses_blank_lines(tmp_path, tok):
    out = tmp_path / "tokdir"
    addition.build_tokenizer(out)
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    responses = [{"text": "03", "reward": 1}, {"text": "04", "reward": 0}, {"text": "05", "reward": 0}]
    path = _write(tmp_path / "d.jsonl", ["", {"prompt": "1+2=", "responses": responses}, "  "])
    # A raw tokenizers.Tokenizer has no EOS notion: it must be named.
    with pytest.raises(ValueError, match=r"data\.eos_token"):
        load_groups(_cfg(path), raw)
    groups, stats = load_groups(_cfg(path, eos_token="<eos>", max_responses=2), raw)
    assert stats.rows_read == 1 and groups[0].source.endswith("d.jsonl:2")
    assert groups[0].response_ids == (tuple(_ids(tok, "03") + [1]), tuple(_ids(tok, "04") + [1]))
    assert groups[0].rewards == (1.0, 0.0) and stats.responses_kept == 2
    groups, _ = load_groups(_cfg(path, append_eos=False), tok)
    assert groups[0].response_ids[0] == tuple(_ids(tok, "03"))


# ---------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming path:line and the field; skip mode counts by reason
# ---------------------------------------------------------------------------------------------------------

GOOD_TEXT = {"prompt": "1+2=", "responses": [{"text": "03", "reward": 1.0}, {"text": "04", "reward": 0.0}]}
GOOD_IDS = {"prompt_ids": [4, 13, 5, 14],
            "responses": [{"ids": [3, 6, 1], "reward": 1.0}, {"ids": [3, 7], "reward": 0}]}


def _with(base, **changes):
    row = json.loads(json.dumps(base))
    row.update(changes)
    return row


def _resp(base, i, **changes):
    row = json.loads(json.dumps(base))
    row["responses"][i].update(changes)
    return row


def _drop_reward(base):
    row = json.loads(json.dumps(base))
    del row["responses"][1]["reward"]
    return row


BAD_ROWS = [
    # (row, reason, field pattern)
    ("{not json", "not_json", r"row: not valid JSON"),
    ("[1, 2]", "bad_schema", r"row: must be a JSON object"),
    ({"responses": GOOD_TEXT["responses"]}, "bad_schema", r"prompt: missing"),
    ({"prompt": "1+2="}, "bad_schema", r"responses: missing"),
    (_with(GOOD_TEXT, extra=1), "bad_schema", r"extra: unknown key"),
    (_resp(GOOD_TEXT, 1, score=2), "bad_schema", r"responses\[1\]\.score: unknown key"),
    (_with(GOOD_TEXT, responses="03"), "bad_schema", r"responses: must be a list"),
    (_with(GOOD_TEXT, responses=["03", "04"]), "bad_schema", r"responses\[0\]: must be an object"),
    (_with(GOOD_TEXT, prompt=12), "bad_schema", r"prompt: must be a string"),
    (_with(GOOD_TEXT, id=[1]), "bad_schema", r"id: must be a JSON scalar"),
    (_with(GOOD_TEXT, responses=[]), "too_few_responses", r"responses: 0 response\(s\)"),
    (_with(GOOD_TEXT, responses=GOOD_TEXT["responses"][:1]), "too_few_responses", r"responses: 1 response\(s\)"),
    (_with(GOOD_TEXT, prompt=""), "empty_prompt", r"prompt: empty"),
    (_with(GOOD_IDS, prompt_ids=[]), "empty_prompt", r"prompt_ids: no tokens"),
    (_resp(GOOD_TEXT, 0, text=""), "empty_response", r"responses\[0\]\.text: empty"),
    (_resp(GOOD_IDS, 1, ids=[]), "empty_response", r"responses\[1\]\.ids: empty"),
    (_with(GOOD_TEXT, prompt="1" * 31 + "+2="), "prompt_too_long", r"prompt: 34 tokens > max_prompt_tokens=32"),
    (_with(GOOD_IDS, prompt_ids=[4] * 33), "prompt_too_long", r"prompt_ids: 33 tokens > max_prompt_tokens=32"),
    # 16 characters + the appended EOS: the EOS counts toward the limit.
    (_resp(GOOD_TEXT, 1, text="0" * 16), "response_too_long", r"responses\[1\]\.text: 17 tokens > max_response"),
    (_resp(GOOD_IDS, 0, ids=[3] * 17), "response_too_long", r"responses\[0\]\.ids: 17 tokens > max_response"),
    (_drop_reward(GOOD_TEXT), "bad_reward", r"responses\[1\]\.reward: missing"),
    (_resp(GOOD_TEXT, 0, reward="1.0"), "bad_reward", r"responses\[0\]\.reward: must be a number"),
    (_resp(GOOD_TEXT, 0, reward=True), "bad_reward", r"responses\[0\]\.reward: must be a number"),
    (_resp(GOOD_TEXT, 0, reward=None), "bad_reward", r"responses\[0\]\.reward: must be a number"),
    ('{"prompt": "1+2=", "responses": [{"text": "03", "reward": NaN}, {"text": "04", "reward": 0}]}',
     "bad_reward", r"responses\[0\]\.reward: must be finite, got nan"),
    ('{"prompt": "1+2=", "responses": [{"text": "03", "reward": 0}, {"text": "04", "reward": -Infinity}]}',
     "bad_reward", r"responses\[1\]\.reward: must be finite, got -inf"),
    (_with(GOOD_IDS, prompt_ids=[4, -1]), "bad_token_id", r"prompt_ids\[1\]: token ids must be non-negative"),
    (_with(GOOD_IDS, prompt_ids=[4, 5.0]), "bad_token_id", r"prompt_ids\[1\]: token ids must be non-negative"),
    (_with(GOOD_IDS, prompt_ids=[True]), "bad_token_id", r"prompt_ids\[0\]: token ids must be non-negative"),
    (_resp(GOOD_IDS, 1, ids=[3, 15]), "bad_token_id", r"responses\[1\]\.ids\[1\]: token id 15 >= vocab_size 15"),
    (_with(GOOD_IDS, prompt_ids="4 5"), "bad_schema", r"prompt_ids: must be a list of token ids"),
    (_with(GOOD_TEXT, prompt_ids=[4]), "mixed_forms", r"prompt_ids: a row has either 'prompt'"),
    (_resp(GOOD_TEXT, 1, ids=[3]), "mixed_forms", r"responses\[1\]\.ids: not allowed in a text-form row"),
    (_resp(GOOD_IDS, 0, text="03"), "mixed_forms", r"responses\[0\]\.text: not allowed in an ids-form row"),
]


@pytest.mark.parametrize("row, reason, field", BAD_ROWS, ids=[f"{i}-{r[1]}" for i, r in enumerate(BAD_ROWS)])
def test_bad_row_raises_with_path_line_and_field(tmp_path, tok, row, reason, field):
    assert reason in SKIP_REASONS
    path = _write(tmp_path / "bad.jsonl", [GOOD_TEXT, GOOD_IDS, row, GOOD_TEXT])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3") + r"(?: \(id=.*\))?: " + field):
        load_groups(_cfg(path), tok, vocab_size=15)
    groups, stats = load_groups(_cfg(path, on_bad_row="skip"), tok, vocab_size=15)
    assert [g.source for g in groups] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert stats.skipped == {reason: 1} and stats.rows_read == 4 and stats.rows_kept == 3
    assert stats.first_error[reason].startswith(f"{path}:3")


def test_error_names_row_id_and_skip_counts_accumulate(tmp_path, tok):
    rows = [_with(GOOD_TEXT, id="p-7", responses=[]), GOOD_TEXT, "oops", _resp(GOOD_TEXT, 0, reward=float("inf"))]
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(f"{path}:1 (id='p-7'): responses:")):
        load_groups(_cfg(path), tok)
    groups, stats = load_groups(_cfg(path, on_bad_row="skip"), tok)
    assert len(groups) == 1 and stats.rows_skipped == 3
    assert stats.skipped == {"too_few_responses": 1, "not_json": 1, "bad_reward": 1}
    assert "1/4 rows kept" in stats.summary()


def test_unfixable_inputs_always_raise(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [GOOD_TEXT])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1") + r": text row .* needs a tokenizer"):
        load_groups(_cfg(path, on_bad_row="skip"))
    with pytest.raises(ValueError, match=r"data\.path: '.*missing\.jsonl' does not exist"):
        load_groups(_cfg(tmp_path / "missing.jsonl"), tok)
    with pytest.raises(ValueError, match=r"no usable rows"):
        load_groups(_cfg(_write(tmp_path / "e.jsonl", ["{", "[]"]), on_bad_row="skip"), tok)
    with pytest.raises(ValueError, match=r"data\.path must name"):
        load_groups(OfflineDataConfig(), tok)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_prompt_tokens": 0}, r"data\.max_prompt_tokens must be >= 1"),
        ({"max_response_tokens": 0}, r"data\.max_response_tokens must be >= 1"),
        ({"min_responses": 1}, r"data\.min_responses must be >= 2"),
        ({"min_responses": 4, "max_responses": 3}, r"data\.max_responses=3 must be >= data\.min_responses=4"),
        ({"on_bad_row": "warn"}, r"data\.on_bad_row must be one of"),
    ],
)
def test_config_validate_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        OfflineDataConfig(path="x.jsonl", **changes).validate()


def test_min_responses_on_text(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [GOOD_TEXT])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: responses: 2 response\(s\), need at least min_responses=3"):
        load_groups(_cfg(path, min_responses=3), tok)
    # A tokenizer larger than the model is refused before any row: test_tokenizer_larger_than_the_model...


# ---------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------


def _toy_groups(n):
    return [Group((i + 1,), ((1,), (2,)), (0.0, 1.0), f"toy:{i + 1}") for i in range(n)]


def _sources(batches):
    return [[g.source for g in b] for b in batches]


def test_sampler_is_deterministic_and_covers_each_epoch(tmp_path):
    groups = _toy_groups(10)
    a = GroupSampler(groups, 4, seed=3)
    b = GroupSampler(groups, 4, seed=3)
    run_a = [a.next_batch() for _ in range(10)]
    assert _sources(run_a) == _sources([b.next_batch() for _ in range(10)])
    assert all(len(batch) == 4 for batch in run_a)
    flat = [g.source for batch in run_a for g in batch]
    # Epochs are the permutations seeded with seed + epoch; batches cross epoch boundaries without dropping.
    for epoch in range(4):
        assert sorted(flat[10 * epoch : 10 * epoch + 10]) == sorted(g.source for g in groups)
    assert flat[:10] != flat[10:20], "each epoch is reshuffled"
    assert _sources([GroupSampler(groups, 4, seed=4).next_batch()]) != _sources(run_a[:1])
    plain = GroupSampler(groups, 3, seed=3, shuffle=False)
    assert [g.source for _ in range(4) for g in plain.next_batch()] == [f"toy:{i % 10 + 1}" for i in range(12)]
    with pytest.raises(ValueError, match=r"groups_per_step=11"):
        GroupSampler(groups, 11, seed=0)


def test_sampler_resumes_exactly_mid_epoch():
    groups = _toy_groups(7)
    reference = GroupSampler(groups, 3, seed=11)
    expected = [reference.next_batch() for _ in range(9)]
    first = GroupSampler(groups, 3, seed=11)
    for _ in range(4):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    assert state["epoch"] == 1 and 0 < state["position"] < 7  # 12 groups drawn: mid-epoch 1
    resumed = GroupSampler(groups, 3, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert _sources([resumed.next_batch() for _ in range(5)]) == _sources(expected[4:])
    with pytest.raises(ValueError, match=r"state is for 7 groups but the dataset has 6"):
        GroupSampler(groups[:6], 3, seed=11).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------------------


def test_collate_layout():
    groups = [
        Group((5, 6, 7), ((8, 9), (10,), (11, 12, 13)), (1.0, 0.0, 0.5), "x:1"),
        Group((20,), ((21, 22, 23, 24), (25,)), (2.0, 2.0), "x:2"),
    ]
    batch = collate(groups, pad_id=0)
    assert set(batch) == {"tokens", "loss_mask", "targets", "rewards", "group_ids"}
    tokens, mask, targets = batch["tokens"], batch["loss_mask"], batch["targets"]
    assert tokens.shape == (5, 6) and tokens.dtype == torch.int64  # longest row: 3 + 3
    assert mask.dtype == torch.bool and targets.dtype == torch.int64
    assert batch["rewards"].dtype == torch.float32 and batch["group_ids"].dtype == torch.int64
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.5, 2.0, 2.0]
    assert batch["group_ids"].tolist() == [0, 0, 0, 1, 1]
    check_group_layout(batch["group_ids"], dp_size=1, micro_batch_size=5, strategy="group_atomic")
    assert tokens[0].tolist() == [5, 6, 7, 8, 9, 0]
    assert tokens[1].tolist() == [5, 6, 7, 10, 0, 0]
    assert tokens[3].tolist() == [20, 21, 22, 23, 24, 0]
    # Position t is scored iff tokens[t + 1] is a response token; the target there is that token.
    assert mask[0].tolist() == [False, False, True, True, False, False]
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert targets[0, :-1].tolist() == tokens[0, 1:].tolist() and targets[0, -1] == 0
    assert tokens[0][1:][mask[0][:-1]].tolist() == [8, 9]
    for row, response in enumerate([(8, 9), (10,), (11, 12, 13), (21, 22, 23, 24), (25,)]):
        assert targets[row][mask[row]].tolist() == list(response)

    padded = collate(groups, seq_len=8, pad_id=3)
    assert padded["tokens"].shape == (5, 8) and padded["tokens"][1, 4:].tolist() == [3, 3, 3, 3]
    assert torch.equal(padded["loss_mask"][:, :6], mask) and not padded["loss_mask"][:, 6:].any()
    with pytest.raises(ValueError, match=r"a row of 6 tokens \(x:1\) does not fit seq_len=5"):
        collate(groups, seq_len=5)


def test_collate_aligns_the_rollouts_logprobs_with_the_targets():
    """A group's behaviour log-probs (the rollout engine's, per response token) land where their token is the
    target, 0 elsewhere; groups with and without them, or a count that is not the response's, are refused."""
    logprobs = ((-0.1, -0.2), (-0.3,), (-0.4, -0.5, -0.6))
    groups = [Group((5, 6, 7), ((8, 9), (10,), (11, 12, 13)), (1.0, 0.0, 0.5), "x:1", behaviour_logprobs=logprobs)]
    batch = collate(groups, seq_len=8)
    behaviour, mask = batch[BEHAVIOUR_KEY], batch["loss_mask"]
    assert behaviour.shape == (3, 8) and behaviour.dtype == torch.float32 and (behaviour[~mask] == 0).all()
    for row, values in enumerate(logprobs):
        assert behaviour[row][mask[row]].tolist() == pytest.approx(values)
    plain = Group((20,), ((21,), (22,)), (0.0, 1.0), "x:2")
    with pytest.raises(ValueError, match="some groups carry the rollout's log-probs and some do not"):
        collate(groups + [plain])
    short = dataclasses.replace(groups[0], behaviour_logprobs=((-0.1,), (-0.3,), (-0.4, -0.5, -0.6)))
    with pytest.raises(ValueError, match=r"1 rollout log-probs for a response of 2 tokens \(x:1\)"):
        collate([short])


def test_loaded_file_collates_within_max_seq_len(tmp_path, tok):
    path = tmp_path / "add.jsonl"
    addition.write_offline_dataset(path, n_prompts=6, k=3, digits=4, seed=1)
    cfg = _cfg(path, max_prompt_tokens=10, max_response_tokens=6)
    groups, _ = load_groups(cfg, tok, vocab_size=len(tok))
    batch = collate(GroupSampler(groups, 2, seed=0).next_batch(), seq_len=cfg.max_seq_len(), pad_id=tok.pad_token_id)
    assert batch["tokens"].shape == (6, 16)
    # 4-digit problems: 10-token prompt, 5 answer digits + EOS scored per row.
    assert batch["loss_mask"].sum(dim=1).tolist() == [6] * 6
    assert (batch["targets"][batch["loss_mask"]].view(6, 6)[:, -1] == tok.eos_token_id).all()


# ---------------------------------------------------------------------------------------------------------
# Addition task
# ---------------------------------------------------------------------------------------------------------


def test_addition_reward():
    assert addition.reward("00000012+00000034=", "000000046") == 1.0
    assert addition.reward("00000012+00000034=", "000000046<eos>") == 1.0
    assert addition.reward("00000012+00000034=", "000000046<eos>123") == 1.0
    assert addition.reward("00000012+00000034=", "46") == 0.0
    assert addition.reward("00000012+00000034=", "0000000460") == 0.0
    assert addition.reward("00000012+00000034=", "") == 0.0
    assert addition.reward("99+99=", "198") == 1.0
    for bad in ("12+34", "12-34=", "1+34=", "a+b="):
        with pytest.raises(ValueError, match="not an addition prompt"):
            addition.reward(bad, "0")
    problems = addition.make_problems(50, digits=3, seed=5)
    assert problems == addition.make_problems(50, digits=3, seed=5) and len({p for p, _ in problems}) == 50
    assert all(re.fullmatch(r"\d{3}\+\d{3}=", p) and len(a) == 4 for p, a in problems)
    assert all(addition.reward(p, a) == 1.0 for p, a in problems)
    held = addition.make_problems(50, digits=3, seed=6, exclude=[p for p, _ in problems])
    assert not {p for p, _ in held} & {p for p, _ in problems}


def test_addition_tokenizer_round_trip(tmp_path):
    built = addition.build_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert 13 <= len(loaded) <= 16 and len(loaded) == len(built) == len(addition.VOCAB)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
    text = "01234567+89012345=090246912"
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == built.encode(text, add_special_tokens=False) and len(ids) == len(text)
    assert loaded("1+2=")["input_ids"] == loaded.encode("1+2=", add_special_tokens=False), "no BOS/EOS added"
    assert loaded.decode(ids) == text
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text


def test_write_offline_dataset_is_deterministic_and_scored(tmp_path, tok):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    addition.write_offline_dataset(a, n_prompts=40, k=4, digits=8, seed=2, p_correct=0.5)
    addition.write_offline_dataset(b, n_prompts=40, k=4, digits=8, seed=2, p_correct=0.5)
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 40 and all(len(r["responses"]) == 4 for r in rows)
    rewards = [x["reward"] for r in rows for x in r["responses"]]
    assert set(rewards) == {0.0, 1.0} and 0.3 < sum(rewards) / len(rewards) < 0.7
    for r in rows:
        answer = f"{sum(int(x) for x in r['prompt'][:-1].split('+')):09d}"
        for x in r["responses"]:
            assert x["reward"] == float(x["text"] == answer)
            wrong = sum(c != d for c, d in zip(x["text"], answer))
            assert len(x["text"]) == 9 and (wrong == 0 if x["reward"] else 1 <= wrong <= 3)
    groups, stats = load_groups(_cfg(a), tok, vocab_size=len(tok))
    assert stats.rows_kept == 40 and all(len(g.response_ids[0]) == 10 for g in groups)


def test_make_tiny_assets_is_idempotent_and_heldout_disjoint(tmp_path):
    out = tmp_path / "tiny"
    args = dict(digits=3, k=4, train_prompts=200, heldout_prompts=50, p_correct=0.5, seed=0)
    first = addition.make_tiny_assets(out, force=False, online_prompts=300, **args)
    assert all(line.startswith("wrote") for line in first) and len(first) == 6
    train_text = (out / "train.jsonl").read_text()
    assert all(line.startswith("kept") for line in addition.make_tiny_assets(out, force=False, **args))
    assert (out / "train.jsonl").read_text() == train_text
    assert AutoTokenizer.from_pretrained(str(out / "tokenizer")).eos_token_id == 1
    prompts = [json.loads(line)["prompt"] for name in ("train", "heldout")
               for line in (out / f"{name}.jsonl").read_text().splitlines()]
    assert len(set(prompts)) == len(prompts) == 250
    online = [json.loads(line)["prompt"] for line in (out / "online_prompts.jsonl").read_text().splitlines()]
    heldout = {json.loads(line)["prompt"] for line in (out / "heldout.jsonl").read_text().splitlines()}
    assert len(set(online)) == len(online) == 300 and not heldout & set(online)


def test_make_tiny_assets_script(tmp_path):
    """The thin tools/ script runs from any directory and reports what it wrote."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_assets.py"
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "a"), "--train-prompts", "8",
                          "--heldout-prompts", "4", "--online-prompts", "16", "--digits", "2"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("wrote") == 6 and (tmp_path / "a" / "heldout.jsonl").is_file()
    import json

    rows = [json.loads(line) for line in (tmp_path / "a" / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(int(r["label"]) == sum(map(int, r["prompt"][:-1].split("+"))) for r in rows)


def test_tokenizer_larger_than_the_model_is_refused_at_start_up(tmp_path, tok):
    """A tokenizer with ids the model has no embedding for fails before any row is read, naming both sizes,
    for transformers and raw tokenizers alike; a model larger than its tokenizer (padded vocabulary) is fine."""
    path = _write(tmp_path / "ok.jsonl", [{"prompt": "1+2=", "responses": [{"text": "3", "reward": 1}] * 2}])
    n = len(tok)
    for tokenizer in (tok, tok.backend_tokenizer):
        with pytest.raises(ValueError, match=rf"tokenizer has {n} tokens .* vocab_size is {n - 1}"):
            load_groups(_cfg(path, eos_token=tok.eos_token), tokenizer, vocab_size=n - 1)
        groups, _ = load_groups(_cfg(path, eos_token=tok.eos_token), tokenizer, vocab_size=n + 100)
        assert len(groups) == 1


def test_datasets_sources_load_to_the_same_groups_as_jsonl(tmp_path, tok):
    """A `save_to_disk` directory and a parquet file with the JSONL rows give the same groups; Arrow's nulls
    (a text row's missing prompt_ids column, and the reverse) count as absent keys; errors name path[index]."""
    import datasets

    eos = tok.eos_token_id
    rows = [
        {"prompt": "12+34=", "responses": [{"text": "046", "reward": 1.0}, {"text": "047", "reward": 0.0}], "id": "a"},
        {"prompt_ids": _ids(tok, "99+01="), "responses": [{"ids": _ids(tok, "100") + [eos], "reward": 1.0}] * 2},
    ]
    want, _ = load_groups(_cfg(_write(tmp_path / "rows.jsonl", rows)), tok)

    def arrow_row(row):  # every column in every row, as a table has them
        responses = [{"text": r.get("text"), "ids": r.get("ids"), "reward": r["reward"]} for r in row["responses"]]
        return {"prompt": row.get("prompt"), "prompt_ids": row.get("prompt_ids"), "responses": responses,
                "id": row.get("id")}

    ds = datasets.Dataset.from_list([arrow_row(r) for r in rows])
    ds.save_to_disk(str(tmp_path / "rows_ds"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    for source in ("rows_ds", "rows.parquet"):
        got, stats = load_groups(_cfg(tmp_path / source), tok)
        assert [(g.prompt_ids, g.response_ids, g.rewards) for g in got] == [
            (g.prompt_ids, g.response_ids, g.rewards) for g in want
        ]
        assert got[1].source == f"{tmp_path / source}[1]" and stats.rows_kept == 2
    nan_row = {"prompt": "1+1=", "responses": [{"text": "2", "reward": float("nan")}] * 2}
    bad = datasets.Dataset.from_list([arrow_row(r) for r in rows + [nan_row]])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad\.parquet\[2\]: responses\[0\]\.reward: .*finite"):
        load_groups(_cfg(tmp_path / "bad.parquet"), tok)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"holds splits \['train'\]; point it at one split's directory"):
        load_groups(_cfg(tmp_path / "splits"), tok)
