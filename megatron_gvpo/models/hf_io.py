"""Reading Hugging Face model directories without loading the whole model: configs and lazy safetensors.

`SafetensorsCheckpoint` is a read-only mapping from tensor name to tensor that opens the shard holding a
tensor only when that tensor is read, so a converter or a pipeline stage touches just the bytes it needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


def load_hf_config(path: str | Path):
    """A transformers config from a model directory or a config.json file (offline; nothing is downloaded)."""
    import transformers

    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"model.path={str(path)!r}: no config.json there")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{file} has no model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


class SafetensorsCheckpoint(Mapping):
    """Lazy name -> tensor mapping over a directory's safetensors shards (with or without an index file)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.directory / f for name, f in weight_map.items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.directory}: no *.safetensors files and no model.safetensors.index.json")
            from safetensors import safe_open

            self._file_of = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self._file_of.update({name: f for name in h.keys()})

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._file_of:
            raise KeyError(name)
        with safe_open(str(self._file_of[name]), framework="pt") as h:
            return h.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def hf_weights(path: str | Path, init: str, seed: int) -> Mapping[str, torch.Tensor]:
    """The model's HF-named tensors: the directory's safetensors ('pretrained'), or Hugging Face's own random
    initialisation of the config under `seed` ('random': computed identically on every rank and layout)."""
    if init == "pretrained":
        return SafetensorsCheckpoint(path)
    import transformers

    config = load_hf_config(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {k: v.detach().float() for k, v in model.state_dict().items()}
