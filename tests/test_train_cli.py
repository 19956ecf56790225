"""Contract of `python -m megatron_gvpo.train` (offline GVPO): on the tiny config with generated assets it
writes config.yaml, metrics.jsonl (step, loss, grad_norm, lr, tokens, the Eq. 17 terms) and checkpoints; the
same config and seed give the same per-step loss at TP=2 and PP=2 (and with full activation recomputation) as in
one process; a run stopped and
restarted in the same directory, or SIGKILLed at a random step and restarted, resumes and reproduces the
uninterrupted run's metrics. A bad config key or value, a missing config file, model path or tokenizer, a
missing prompts file or a bad data row end the command with exit status 2 and one line naming the field, no
traceback; a ValueError later in the run keeps its traceback."""

from pathlib import Path

import pytest

from megatron_gvpo.data.addition import make_tiny_assets
from tests.processes import metrics_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, train_prompts=64, heldout_prompts=8)
    return out


def cli_run(run_dir, assets, overrides):
    from megatron_gvpo.train import main

    main(["--config", str(REPO / "configs/tiny_cpu.yaml"), "--set", f"run.dir={run_dir}",
          f"model.path={REPO / 'configs/models/tiny_llama.json'}", f"model.tokenizer={assets / 'tokenizer'}",
          f"data.path={assets / 'train.jsonl'}", "train.steps=4", "run.save_interval=2", *overrides])
    return True


@pytest.fixture(scope="module")
def single(gloo, assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    gloo.run(1, cli_run_with_checkpoints, str(run_dir), assets, [])
    return run_dir


def test_outputs(single):
    records = metrics_records(single)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr", "tokens", "cov_reward_logp", "cov_logp_ref", "var_logp", "reward_mean"):
        assert all(key in r for r in records), key
    assert (single / "config.yaml").is_file()
    assert (single / "checkpoints" / "latest").read_text().strip() == "step_0000004"


@pytest.mark.parametrize("overrides", [["parallel.tp=2"], ["parallel.pp=2", "algo.group_strategy=prepass"],
                                       ["parallel.tp=2", "train.recompute=full"]])
def test_same_loss_at_every_layout(gloo, assets, single, tmp_path, overrides):
    gloo.run(2, cli_run_with_checkpoints, str(tmp_path), assets, overrides)
    want, got = metrics_records(single), metrics_records(tmp_path)
    for w, g in zip(want, got):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)


def cli_run_with_checkpoints(run_dir, assets, overrides):
    from tests.gloo_pool import checkpoint_helpers_allowed

    with checkpoint_helpers_allowed():
        return cli_run(run_dir, assets, overrides)


def test_restart_resumes_and_reproduces(gloo, assets, single, tmp_path):
    """Run to step 2 (a checkpoint), then start the same command again with train.steps=4: it resumes."""
    gloo.run(1, cli_run_with_checkpoints, str(tmp_path), assets, ["train.steps=2"])
    gloo.run(1, cli_run_with_checkpoints, str(tmp_path), assets, [])
    got, want = metrics_records(tmp_path), metrics_records(single)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for w, g in zip(want, got):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6)


def train_command(run_dir, assets, overrides=()):
    import sys

    return [sys.executable, "-m", "megatron_gvpo.train", "--config", str(REPO / "configs/tiny_cpu.yaml"), "--set",
            f"run.dir={run_dir}", f"model.tokenizer={assets / 'tokenizer'}", f"data.path={assets / 'train.jsonl'}",
            *overrides]


def test_sigkill_at_a_random_step_then_resume_reproduces_the_uninterrupted_run(assets, single, tmp_path):
    """SIGKILL (no handler, no clean-up) once 1 or 2 steps are logged (chosen at random; with a checkpoint every
    2 steps the kill lands before, after or while one is written), then the same command again: the metrics
    equal the uninterrupted run's, and lines logged after the last checkpoint appear once."""
    import os
    import random
    import subprocess

    from tests.processes import signal_after_lines

    lines = random.Random().choice([1, 2])
    model = f"model.path={REPO / 'configs/models/tiny_llama.json'}"
    code, out = signal_after_lines(train_command(tmp_path, assets, [model, "train.steps=4", "run.save_interval=2"]),
                                   tmp_path / "metrics.jsonl", lines)
    assert code == -9, out  # killed, not finished
    assert [r["step"] for r in metrics_records(tmp_path)][-1] < 4
    subprocess.run(train_command(tmp_path, assets, [model, "train.steps=4", "run.save_interval=2"]) + ["--resume"],
                   cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    got, want = metrics_records(tmp_path), metrics_records(single)
    assert [r["step"] for r in got] == [1, 2, 3, 4], f"killed after {lines} logged steps"
    for w, g in zip(want, got):
        for key in ("loss", "grad_norm", "reward_mean", "cov_reward_logp"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (key, g["step"], lines)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_and_stops(assets, tmp_path, sig):
    """SLURM's signals before pre-emption: the run finishes its step, checkpoints it and exits cleanly."""
    import signal

    from tests.processes import signal_after_lines

    code, out = signal_after_lines(train_command(tmp_path, assets, ["train.steps=1000", "run.save_interval=0"]),
                                   tmp_path / "metrics.jsonl", 2, getattr(signal, sig), timeout_s=120)
    assert code == 0, out
    last = metrics_records(tmp_path)[-1]["step"]
    assert 2 <= last < 1000 and "pre-emption signal: checkpointed step" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"


MANAGER_SCRIPT = """
import sys, time
from megatron_gvpo.megatron import checkpoint
checkpoint._results_queue_that_dies_with_us()
print(checkpoint._results_manager._process.pid, flush=True)
time.sleep(120)
"""


def test_checkpoint_results_manager_survives_preemption_signals_and_dies_with_the_trainer():
    """Megatron's checkpoint writer reports through a Manager process. torchrun forwards SLURM's pre-emption
    signals to each rank's whole process group: the manager must outlive them (the checkpoint they ask for
    needs it), and still go when the trainer is SIGKILLed (no orphan holding the trainer's stdout)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\nState:\tZ" not in f.read()
        except FileNotFoundError:
            return False

    trainer = subprocess.Popen([sys.executable, "-c", MANAGER_SCRIPT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        manager = int(trainer.stdout.readline())
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            os.kill(manager, sig)
        time.sleep(1.0)
        assert alive(manager)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 15
        while alive(manager) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(manager)
    finally:
        trainer.kill()


MANAGER_UNDER_FIRE_SCRIPT = """
import os, signal, threading, time
from megatron_gvpo.megatron import checkpoint
received = []
signal.signal(signal.SIGUSR1, lambda *a: received.append(1))
starting = threading.Event()
def fire():  # torchrun's pre-emption signal, to the whole process group, all through the manager's start
    starting.wait()
    while starting.is_set():
        os.killpg(os.getpgrp(), signal.SIGUSR1)
        time.sleep(0.005)
threading.Thread(target=fire, daemon=True).start()
starting.set()
checkpoint._results_queue_that_dies_with_us()
starting.clear()
time.sleep(0.5)
checkpoint._results_manager.Queue().put(1)  # the manager still answers
print(len(received) > 0, checkpoint._results_manager._process.exitcode, flush=True)
"""


def test_checkpoint_results_manager_survives_a_preemption_signal_while_it_starts():
    """The first save starts the manager, and that is where a pre-empted trainer often is: a signal to the
    process group while the manager's process starts, before it can ignore the signal, killed it (the save then
    failed with EOFError). The trainer still gets the signal."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MANAGER_UNDER_FIRE_SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=120, start_new_session=True)  # its own process group to fire at
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "None"], done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------------------
# User errors: one line naming the field, exit status 2
# ---------------------------------------------------------------------------------------------------------

BAD_ROW = '{"prompt": "1+2=", "responses": [{"text": "3", "reward": 1.0}]}\n'  # 1 response, the config asks for 4

USER_ERRORS = {  # case: (--set overrides or other arguments, what the one line must say)
    "unknown key": (["--set", "bad.key=1"], r"unknown config key 'bad'"),
    "bad value": (["--set", "train.steps=abc"], r"train\.steps must be an integer, got 'abc'"),
    "missing config file": (["--config", "{tmp}/missing.yaml"], r"cannot read config file \S*missing\.yaml"),
    # configs/tiny_cpu.yaml before tools/make_tiny_assets.py: transformers took the path for a hub repo id.
    "missing tokenizer": (["--set", "model.tokenizer=runs/not_made_yet/tokenizer"],
                          r"model\.tokenizer 'runs/not_made_yet/tokenizer' does not exist \(relative to .*\); it "
                          r"must be a directory with Hugging Face tokenizer files \(tokenizers are never downloaded\)"),
    "bad data row": (["--set", "model.tokenizer={assets}/tokenizer", "data.path={tmp}/groups.jsonl"],
                     r"groups\.jsonl:4: "),
    "missing prompts file": (["--set", "model.tokenizer={assets}/tokenizer", "rollout.source=online",
                              "prompts.path={tmp}/prompts.jsonl", "prompts.max_prompt_tokens=20",
                              "rollout.max_new_tokens=12"], r"prompts\.path\W.*prompts\.jsonl\W.*does not exist"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_bad_config_or_input_ends_the_command_with_one_line_naming_it(assets, tmp_path, case):
    """`python -m megatron_gvpo.train` with a bad key, value, config file, path or data row: exit status 2 and
    `megatron_gvpo.train: error: <message naming the field or file:line>` as the last line, no traceback."""
    import os
    import re
    import subprocess
    import sys

    (tmp_path / "groups.jsonl").write_text("".join((assets / "train.jsonl").read_text().splitlines(True)[:3]) + BAD_ROW)
    args, message = USER_ERRORS[case]
    args = [a.format(tmp=tmp_path, assets=assets) for a in args]
    if "--config" not in args:
        args = ["--config", "configs/tiny_cpu.yaml", *args]
    run = subprocess.run([sys.executable, "-m", "megatron_gvpo.train", *args, "--set", f"run.dir={tmp_path / 'run'}"],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    last = run.stderr.rstrip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert last.startswith("megatron_gvpo.train: error: ") and re.search(message, last), last
    assert run.stderr.count("error:") == 1


def test_only_start_up_value_errors_become_one_line(capsys):
    """A ValueError raised under `user_errors()` (start-up: config, paths, data) is one line and status 2; one
    raised anywhere else (a crash mid-run) keeps its traceback."""
    from megatron_gvpo.utils.cli import UsageError, run_main, user_errors

    def bad_config() -> int:
        with user_errors():
            raise ValueError("algo.beta must be > 0, got -1")

    def crash() -> int:
        raise ValueError("a bug mid-run")

    assert run_main("prog", bad_config) == 2
    assert capsys.readouterr().err == "prog: error: algo.beta must be > 0, got -1\n"
    with pytest.raises(ValueError, match="a bug mid-run"):
        run_main("prog", crash)
    with pytest.raises(UsageError):  # still a ValueError for callers in the same process
        bad_config()


def test_model_paths_are_checked_before_anything_loads(tmp_path):
    from megatron_gvpo.models.hf_io import check_model_paths

    config = REPO / "configs/models/tiny_llama.json"
    check_model_paths(str(config))
    with pytest.raises(ValueError, match=rf"^model\.path '{tmp_path}/m' does not exist; it must be a Hugging Face "
                                         r"model directory or a config\.json file \(models are never downloaded\)"):
        check_model_paths(str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"^model\.path '.*' is a directory without config\.json"):
        check_model_paths(str(tmp_path))
    with pytest.raises(ValueError, match=r"^model\.tokenizer '.*tok' does not exist"):
        check_model_paths(str(config), tokenizer=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"^model\.tokenizer '.*tiny_llama\.json' is not a directory"):
        check_model_paths(str(config), tokenizer=str(config))
    with pytest.raises(ValueError, match=r"^model\.load '.*ckpt' does not exist; it must be a Megatron checkpoint"):
        check_model_paths(str(config), load=str(tmp_path / "ckpt"))
