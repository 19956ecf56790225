"""A verifiable toy task for the tiny CPU config and the tests: N-digit addition with a character tokenizer.

Prompt "{a:0Nd}+{b:0Nd}=" (e.g. "00000012+00000034=" for N = 8), answer "{a+b:0(N+1)d}" ("000000046")
followed by the end token <eos>. The reward is exact match, 1.0 or 0.0. Everything is local: the tokenizer is
built with the `tokenizers` library and saved with `save_pretrained`, so
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline.

Vocabulary (15 symbols): <pad>=0, <eos>=1, <unk>=2, then "0".."9" = 3..12, "+" = 13, "=" = 14. Every
character is one token; decoding concatenates them with no spaces.

`write_offline_dataset` writes a file in the offline schema of data/offline.py (text form): each prompt with k
responses, each the correct answer with probability p_correct and otherwise a corrupted one (1 to 3 digits
changed, so always wrong). Build the tiny assets with `tools/make_tiny_assets.py`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SYMBOLS = tuple("0123456789+=")
VOCAB = {PAD: 0, EOS: 1, UNK: 2, **{s: 3 + i for i, s in enumerate(SYMBOLS)}}
DEFAULT_DIGITS = 8


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer, save it into out_dir (save_pretrained) and return it.

    transformers is imported here, not at module level, so the task and its reward stay importable without it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    # WordLevel maps whole pre-tokens; isolating every character makes it a character-level tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens with no separator (the default decoder would insert spaces between them).
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    hf.save_pretrained(str(out_dir))
    return hf


def _format(a: int, b: int, digits: int) -> tuple[str, str]:
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"


def make_problems(
    n: int, digits: int = DEFAULT_DIGITS, seed: int = 0, exclude: Collection[str] = ()
) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs with operands uniform in [0, 10**digits), deterministic given seed.

    exclude: prompts to leave out (e.g. the training prompts, to keep a held-out set disjoint).
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    space = 10 ** (2 * digits) - len(set(exclude))
    if n > space:
        raise ValueError(f"cannot draw {n} distinct {digits}-digit problems (only {space} available)")
    rng = random.Random(seed)
    seen = set(exclude)
    problems = []
    while len(problems) < n:
        prompt, answer = _format(rng.randrange(10**digits), rng.randrange(10**digits), digits)
        if prompt not in seen:
            seen.add(prompt)
            problems.append((prompt, answer))
    return problems


def _answer(prompt_text: str) -> str:
    body, eq, rest = prompt_text.partition("=")
    a, plus, b = body.partition("+")
    if not (eq and plus and not rest and a.isdigit() and b.isdigit() and len(a) == len(b)):
        raise ValueError(f"not an addition prompt of the form '<N digits>+<N digits>=': {prompt_text!r}")
    return f"{int(a) + int(b):0{len(a) + 1}d}"


def reward(prompt_text: str, response_text: str) -> float:
    """1.0 if the response is exactly the zero-padded sum, else 0.0.

    response_text is the decoded response; anything from the first <eos> on is ignored, so it may be decoded
    with or without special tokens. Raises ValueError if prompt_text is not an addition prompt.
    """
    answer = _answer(prompt_text)
    return 1.0 if response_text.split(EOS, 1)[0] == answer else 0.0


def _corrupt(answer: str, rng: random.Random) -> str:
    """The answer with 1 to 3 distinct digit positions changed to a different digit (so always wrong)."""
    chars = list(answer)
    for pos in rng.sample(range(len(chars)), k=min(len(chars), rng.randint(1, 3))):
        chars[pos] = rng.choice([d for d in "0123456789" if d != chars[pos]])
    return "".join(chars)


def write_offline_dataset(
    path: str | Path,
    n_prompts: int,
    k: int,
    digits: int = DEFAULT_DIGITS,
    seed: int = 0,
    p_correct: float = 0.5,
    exclude: Collection[str] = (),
) -> list[str]:
    """Write n_prompts rows of k scored responses (offline text schema) to path; return the prompts written.

    Deterministic given the arguments. exclude: prompts not to use (see make_problems).
    """
    if k < 1 or n_prompts < 1:
        raise ValueError(f"n_prompts and k must be >= 1, got n_prompts={n_prompts}, k={k}")
    if not 0.0 <= p_correct <= 1.0:
        raise ValueError(f"p_correct must be in [0, 1], got {p_correct}")
    problems = make_problems(n_prompts, digits, seed, exclude)
    # A separate stream for the responses, so the problems do not change with k or p_correct.
    rng = random.Random(f"responses-{seed}")
    lines = []
    for i, (prompt, answer) in enumerate(problems):
        texts = [answer if rng.random() < p_correct else _corrupt(answer, rng) for _ in range(k)]
        responses = [{"text": t, "reward": reward(prompt, t)} for t in texts]
        lines.append(json.dumps({"id": i, "prompt": prompt, "responses": responses}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return [p for p, _ in problems]


def _read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def write_prompt_file(path: str | Path, prompts: list[str]) -> None:
    """Prompts for online training (schema of data/prompts.py), each labelled with its answer."""
    lines = [json.dumps({"id": i, "prompt": p, "label": _answer(p)}) for i, p in enumerate(prompts)]
    Path(path).write_text("\n".join(lines) + "\n")


def make_tiny_assets(
    out: str | Path,
    digits: int = DEFAULT_DIGITS,
    k: int = 4,
    train_prompts: int = 512,
    heldout_prompts: int = 128,
    p_correct: float = 0.5,
    seed: int = 0,
    force: bool = False,
    online_prompts: int = 16384,
) -> list[str]:
    """The tiny CPU assets in `out`: tokenizer/, train.jsonl and heldout.jsonl (held-out prompts drawn with
    seed + 1, disjoint from the training prompts), and their prompts alone with answers as labels
    (train_prompts.jsonl, heldout_prompts.jsonl) for online training. Writes what is missing (everything with
    `force`); returns one line per output saying what happened.

    online_prompts.jsonl: `online_prompts` fresh problems (seed + 2, disjoint from the held-out prompts) for the
    main job. Long online runs need many: on train_prompts.jsonl's 512 the main job sees each prompt every 16
    steps, and held-out accuracy stalls while the rollout reward climbs (the policy learns those answers)."""
    out = Path(out)
    report = []
    tok_dir = out / "tokenizer"
    if force or not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(tok_dir)
        report.append(f"wrote   {tok_dir}")
    else:
        report.append(f"kept    {tok_dir} (exists; --force rewrites)")

    train, heldout = out / "train.jsonl", out / "heldout.jsonl"
    if force or not train.exists():
        write_offline_dataset(train, train_prompts, k, digits, seed=seed, p_correct=p_correct)
        report.append(f"wrote   {train} ({train_prompts} prompts x {k} responses, {digits} digits)")
        # The held-out set excludes the training prompts, so a rewritten train set invalidates it.
        force = True
    else:
        report.append(f"kept    {train} (exists; --force rewrites)")
    if force or not heldout.exists():
        write_offline_dataset(
            heldout, heldout_prompts, k, digits, seed=seed + 1, p_correct=p_correct, exclude=_read_prompts(train)
        )
        report.append(f"wrote   {heldout} ({heldout_prompts} prompts x {k} responses, disjoint from train)")
    else:
        report.append(f"kept    {heldout} (exists; --force rewrites)")
    for groups, prompts in ((train, out / "train_prompts.jsonl"), (heldout, out / "heldout_prompts.jsonl")):
        if force or not prompts.exists():
            write_prompt_file(prompts, _read_prompts(groups))
            report.append(f"wrote   {prompts} (the prompts of {groups.name}, labelled with their answers)")
        else:
            report.append(f"kept    {prompts} (exists; --force rewrites)")
    online = out / "online_prompts.jsonl"
    if force or not online.exists():
        problems = make_problems(online_prompts, digits, seed=seed + 2, exclude=_read_prompts(heldout))
        write_prompt_file(online, [prompt for prompt, _ in problems])
        report.append(f"wrote   {online} ({online_prompts} prompts for online training, disjoint from held-out)")
    else:
        report.append(f"kept    {online} (exists; --force rewrites)")
    return report
