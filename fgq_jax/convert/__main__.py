"""CLI: convert a PyTorch checkpoint to an orbax Flax-variables directory.

    python -m fgq_jax.convert ../shared/models/cifar-resnet/resnet20-12fca82f.th --model resnet20 \
        --out converted/resnet20 [--overwrite] [--num-classes N]

Writes DIR/variables (orbax) and DIR/metadata.json (model, source path and sha256, git rev, versions);
load it back with ``fgq_jax.checkpoint.load_variables(DIR)``. Exit status 1 with a one-line error on a
missing/unreadable/mismatching checkpoint or an existing DIR without --overwrite.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

from fgq_jax.models import MODEL_NAMES


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fgq_jax.convert", description="Convert a PyTorch checkpoint to Flax variables (orbax)."
    )
    parser.add_argument("src", help="PyTorch checkpoint (.th with a 'state_dict', or a torchvision .pth)")
    parser.add_argument("--model", required=True, choices=MODEL_NAMES, help="target architecture")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default 10 CIFAR / 1000 ImageNet)")
    args = parser.parse_args(argv)

    # Imported here so that `--help` is fast.
    import jax

    from fgq_jax.checkpoint import save_variables
    from fgq_jax.convert.torch_convert import convert_torch_checkpoint
    from fgq_jax.models import get_model

    try:
        if os.path.exists(args.out) and not args.overwrite:  # fail before the (slow) conversion
            raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
        params, batch_stats = convert_torch_checkpoint(args.src, args.model, args.num_classes)
        spec = get_model(args.model, args.num_classes)
        metadata = {
            "model": spec.name,
            "num_classes": spec.num_classes,
            "dataset_family": spec.dataset_family,
            "source_file": os.path.abspath(args.src),
            "source_sha256": sha256_file(args.src),
            "source_format": "pytorch",
            "converter": "fgq_jax.convert",
        }
        out = save_variables(
            args.out, {"params": params, "batch_stats": batch_stats}, metadata, overwrite=args.overwrite
        )
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"converted {args.src} -> {out} ({spec.name}, {n_params:,} parameters, sha256 {metadata['source_sha256'][:12]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
