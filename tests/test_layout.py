"""The package's layout, kept by tools rather than memory: the layer order and the absence of import cycles
(import-linter, contracts in pyproject.toml), ruff with the project's rules, no module over 600 lines, and no run
output at the repository root.

The contract check is shown able to fail: on a copy of the package with one upward import added (the pure GVPO
math importing the rollout loop), `lint-imports` names that import and exits non-zero.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MAX_MODULE_LINES = 600


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's check of the package under `root` against the contracts in pyproject.toml."""
    return subprocess.run([str(VENV_BIN / "lint-imports"), "--config", str(REPO / "pyproject.toml")], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)


def test_imports_follow_the_layer_order_without_cycles():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "layers: pure math at the bottom" in done.stdout, done.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path):
    shutil.copytree(REPO / "megatron_gvpo", tmp_path / "megatron_gvpo",
                    ignore=shutil.ignore_patterns("__pycache__", "cpu_stubs"))
    gvpo = tmp_path / "megatron_gvpo" / "algo" / "gvpo.py"
    gvpo.write_text(gvpo.read_text() + "\nfrom megatron_gvpo.rollout.online import OnlineSource  # noqa: E402\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "megatron_gvpo.algo is not allowed to import megatron_gvpo.rollout" in done.stdout, done.stdout
    assert "megatron_gvpo.algo.gvpo -> megatron_gvpo.rollout.online" in done.stdout, done.stdout


def test_ruff_finds_nothing_with_the_projects_rules():
    done = subprocess.run([str(VENV_BIN / "ruff"), "check", "--no-cache", "megatron_gvpo", "tests", "benchmarks",
                           "tools"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_over_600_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "megatron_gvpo").rglob("*.py")}
    assert sizes, "no modules found"
    over = {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def test_the_repository_root_holds_no_run_output():
    """What runs write at the root (SLURM's job output, run directories) is ignored, and none of it is tracked."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    root_files = [f for f in tracked.stdout.splitlines() if "/" not in f]
    assert not [f for f in root_files if f.endswith((".out", ".log", ".jsonl"))], root_files
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "slurm-7.out", "runs/x/metrics.jsonl"], cwd=REPO,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["slurm-7.out", "runs/x/metrics.jsonl"], ignored.stdout + ignored.stderr
