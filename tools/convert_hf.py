"""Convert Hugging Face checkpoints into Megatron dist_checkpointing checkpoints and back.

    python tools/convert_hf.py import --hf DIR --out DIR [--tp N --pp M --vpp V --ep E --etp T] [--dtype bf16] [--force]
    python tools/convert_hf.py export --megatron DIR --out DIR [--dtype bf16] [--max-shard-size 2GB] [--force]

import writes the model weights as a Megatron checkpoint that the trainer loads at any TP/PP/DP layout
(`--set model.load=DIR`); --tp/--pp/--vpp/--ep/--etp check that the layout fits the model and --tp sets the
vocabulary padding. Mixture-of-experts checkpoints store each layer's experts along one expert axis, so the
same checkpoint loads at any expert-parallel size too.
export takes such a checkpoint, or a training checkpoint (`<run.dir>/checkpoints/step_NNNNNNN`), and writes
safetensors shards with an index, config.json, generation_config.json and the tokenizer files, which
transformers and SGLang load. Both stream one tensor at a time (see megatron_gvpo/megatron/convert/).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.megatron.convert.common import DTYPES  # noqa: E402
from megatron_gvpo.megatron.convert.to_hf import export_hf  # noqa: E402
from megatron_gvpo.megatron.convert.to_megatron import import_hf  # noqa: E402


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5G', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="HF directory -> Megatron checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    imp.add_argument("--tp", type=int, default=1)
    imp.add_argument("--pp", type=int, default=1)
    imp.add_argument("--vpp", type=int, default=None)
    imp.add_argument("--ep", type=int, default=1, help="expert-parallel size (mixture-of-experts models)")
    imp.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    exp = sub.add_parser("export", help="Megatron checkpoint -> HF directory")
    exp.add_argument("--megatron", required=True, help="checkpoint directory (import output or a training step)")
    exp.add_argument("--max-shard-size", type=parse_size, default=2 * 2**30, help="per safetensors file (2GB)")
    for p in (imp, exp):
        p.add_argument("--out", required=True, help="output directory (written as OUT.tmp, renamed when complete)")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: keep the source dtype")
        p.add_argument("--force", action="store_true", help="replace an existing output directory")
        p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.direction == "import":
            summary = import_hf(args.hf, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                                etp=args.etp, dtype=args.dtype,
                                force=args.force, progress=not args.no_progress)
        else:
            summary = export_hf(args.megatron, args.out, dtype=args.dtype, force=args.force,
                                max_shard_bytes=args.max_shard_size, progress=not args.no_progress)
    except ValueError as e:
        print(f"convert_hf {args.direction}: error: {e}", file=sys.stderr)
        return 2
    print(summary.line(f"{args.direction} -> {args.out}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
