# syntax=docker/dockerfile:1.7
# GPU image of megatron_gvpo: the Megatron-Core trainer (Transformer Engine) and the SGLang rollout servers.
#
#   docker build -t megatron-gvpo:0.1.0 .
#   docker run --gpus all --ipc=host --rm megatron-gvpo:0.1.0 python -m megatron_gvpo.train --help
#   enroot import -o megatron-gvpo.sqsh dockerd://megatron-gvpo:0.1.0
#   CONTAINER_IMAGE=$PWD/megatron-gvpo.sqsh sbatch launch/gvpo_70b.sh          # pyxis (launch/README.md)
#
# Base: NGC PyTorch 26.08 (release notes:
# https://docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-26-08.html): Ubuntu 24.04, Python 3.12,
# CUDA 13.4 and PyTorch 2.14.0a0, the closest to the torch 2.14.1 that sglang 0.5.23 is built against (the 25.12
# notes, rel-25-12.html, give Python 3.12 with PyTorch 2.10). Transformer Engine is preinstalled in every NGC
# PyTorch release since 22.09 (Transformer Engine's installation guide); Apex is in the contents the NGC notes
# list (e.g. rel_20-12), and the RUN at the end reports whether this release still has it. Since 25.03
# /etc/pip/constraint.txt pins every package the image ships. That RUN checks the Python, CUDA and Transformer
# Engine assumptions, so a different base fails the build rather than the job.
FROM nvcr.io/nvidia/pytorch:26.08-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/megatron_gvpo

# requirements/gpu.txt explains the two passes: its dependencies under the image's constraints, then sglang
# itself without dependencies (its metadata pins torch==2.14.1 and would replace the image's build).
COPY requirements/gpu.txt requirements/gpu.txt
RUN grep -v '^sglang==' requirements/gpu.txt > /tmp/gpu_deps.txt \
    && pip install --no-cache-dir --disable-pip-version-check -r /tmp/gpu_deps.txt \
    && grep '^sglang==' requirements/gpu.txt > /tmp/gpu_sglang.txt \
    && pip install --no-cache-dir --disable-pip-version-check --no-deps -r /tmp/gpu_sglang.txt \
    && rm /tmp/gpu_deps.txt /tmp/gpu_sglang.txt

# pyproject.toml requires Python 3.11 (the CPU stack's pins) and this image has 3.12, so the package runs from
# its source tree on PYTHONPATH instead of `pip install -e .`.
COPY pyproject.toml README.md ./
COPY megatron_gvpo megatron_gvpo
COPY configs configs
COPY launch launch
COPY tools tools
ENV PYTHONPATH=/opt/megatron_gvpo

# find_spec, not import: importing Transformer Engine or SGLang's kernels wants a GPU, which `docker build` lacks.
RUN python - <<'PY'
import importlib.util
import sys

import torch

assert sys.version_info[:2] == (3, 12), sys.version
assert torch.version.cuda and torch.version.cuda.startswith("13."), torch.version.cuda
wanted = ["transformer_engine", "megatron.core", "transformers", "sglang", "sglang_router", "flashinfer",
          "megatron_gvpo.train", "megatron_gvpo.launch"]
missing = [name for name in wanted if importlib.util.find_spec(name) is None]
assert not missing, f"missing from the image: {missing}"
# Megatron-Core takes its fused Adam from Transformer Engine first and Apex second: Apex is optional.
apex = "with" if importlib.util.find_spec("apex") else "without"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}, {apex} apex: ok")
PY
