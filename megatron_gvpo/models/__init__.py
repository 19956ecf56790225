"""Model architectures and checkpoint formats as data: HF config -> Arch, HF <-> Megatron name maps and
tensor transforms, TP split rules, lazy safetensors. No Megatron imports here, so converters can use it."""
