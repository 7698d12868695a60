"""``python -m compress.export RUN_DIR [-o FILE] [--fp16] [--onnx FILE]``: pack, report, check.

Writes ``RUN_DIR/model.cpk`` (or ``-o``) from ``RUN_DIR/model.pt`` and prints its size report
(an existing ``model.cpk``, the run's own, is kept unless ``--force``);
with ``--onnx FILE`` also the ONNX model, whose logits onnxruntime must reproduce on the first
``--check-images`` CIFAR-10 test images (default all 10,000; 0 skips the check). Exit status 2
on bad input (one ``error:`` line), 1 if the onnxruntime check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from compress.checkpoint import Checkpoint, atomic_write, load_checkpoint
from compress.export.artifact import SUFFIX, reference, save, size_report


def _resolve(source: str) -> Path:
    """The checkpoint file of a run dir (``model.pt``) or the file itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint (give a run dir holding model.pt, or a .pt file)")
    return path


def _read(path: Path) -> Checkpoint:
    try:
        return load_checkpoint(str(path))
    except ValueError as e:
        reason = str(e).splitlines()[0]  # torch's unpickling errors run over many lines
        raise ValueError(f"{path}: cannot read the checkpoint ({reason})") from None


def _print_size(out: Path, report: dict[str, Any]) -> None:
    print(f"wrote {out}")
    print(f"  fp32_bytes        {report['fp32_bytes']:>10,}")
    print(f"  compressed_bytes  {report['compressed_bytes']:>10,}")
    print(f"  ratio             {report['ratio']:>10.2f}x")
    print(f"  bits_per_weight   {report['bits_per_weight']:>10.3f}")
    print(f"  predicted_bytes   {report['predicted_bytes']:>10,}  (actual {report['prediction_error']:+.2%})")
    print(f"  weight layouts    {report['weight_layouts']}")


def _onnx_module() -> ModuleType:
    try:
        from compress.export import onnx_model
    except ImportError as e:
        raise ValueError(f"--onnx needs the onnx extra ({e}): pip install -e '.[onnx]'") from None
    return onnx_model


def _test_images(count: int, data: str | None) -> torch.Tensor | None:
    """The first ``count`` CIFAR-10 test images of ``data`` (None for 0)."""
    if not count:
        return None
    if not data:
        raise ValueError("--onnx checks onnxruntime on CIFAR-10 test images: set COMPRESS_DATA or --data to a "
                         "CIFAR-10 root (or --check-images 0 to skip the check)")
    from compress.verify import test_set

    return test_set(Path(data))[0][:count]


def export_onnx(ckpt: Checkpoint, out: Path, report: dict[str, Any], images: torch.Tensor | None) -> bool:
    """Write the ONNX model of ``ckpt`` to ``out``, print its size beside the artifact's, and
    check it with onnxruntime on ``images`` (None: no check); returns whether the check passed."""
    onnx_model = _onnx_module()
    graph = onnx_model.to_onnx(ckpt)
    atomic_write(out, lambda f: f.write(graph.proto.SerializeToString()))
    size = out.stat().st_size
    print(f"wrote {out}")
    print(f"  onnx_bytes        {size:>10,}  (model.cpk {report['compressed_bytes']:,}, fp32 {report['fp32_bytes']:,}; "
          f"{size / report['compressed_bytes']:.2f}x the .cpk)")
    print(f"  weights           {graph.describe()}")
    if images is None:
        return True
    model = reference(ckpt)
    model.load_state_dict(ckpt.state_dict)
    agreement = onnx_model.compare(out, model, images)
    print(f"  check             {agreement.describe()}")
    return agreement.ok


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use an integer >= 0")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m compress.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run dir (holding model.pt) or checkpoint file")
    parser.add_argument("-o", "--output", help=f"artifact path (default: next to the checkpoint, *{SUFFIX})")
    parser.add_argument("--fp16", action="store_true", help="store unquantized floats as float16 (the artifact only)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing artifact at the default path")
    parser.add_argument("--onnx", type=Path, metavar="FILE", help="also write the network as ONNX and check it")
    parser.add_argument("--check-images", type=_count, default=10_000, metavar="N",
                        help="test images the onnxruntime check runs (default: 10000, all; 0: no check)")
    parser.add_argument("--data", default=os.environ.get("COMPRESS_DATA"),
                        help="CIFAR-10 root for the check (default: $COMPRESS_DATA)")
    args = parser.parse_args(argv)
    try:
        path = _resolve(args.source)
        ckpt = _read(path)
        images = None
        if args.onnx:  # fail before writing anything: the extra is missing, or the test images
            _onnx_module()
            images = _test_images(args.check_images, args.data)
        out = Path(args.output) if args.output else path.with_suffix(SUFFIX)
        fp_dtype = "float16" if args.fp16 else "float32"
        if out.exists() and not args.output and not args.force:
            if not args.onnx:  # the run's own artifact, described by its metrics.json
                raise ValueError(f"{out} exists (the run's own artifact): give -o FILE for a new one, or --force to overwrite it")
            report = size_report(ckpt, fp_dtype)
            print(f"kept {out} (exists; --force rewrites it)")
        else:
            report = save(ckpt, out, fp_dtype)
            _print_size(out, report)
        ok = export_onnx(ckpt, args.onnx, report, images) if args.onnx else True
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1
