"""``python -m compress.export RUN_DIR [-o FILE] [--fp16] [--onnx FILE] [--int8 FILE]``: pack, report, check.

Writes ``RUN_DIR/model.cpk`` (or ``-o``) from ``RUN_DIR/model.pt`` and prints its size report
(an existing ``model.cpk``, the run's own, is kept unless ``--force``);
with ``--onnx FILE`` also the ONNX model, whose logits onnxruntime must reproduce on the first
``--check-images`` CIFAR-10 test images (default all 10,000; 0 skips the check). A network
trained on another dataset (its checkpoint's data config) is checked on that dataset's test
images (``compress.verify.test_tensors``), or where they cannot be had on at most
:data:`RANDOM_IMAGES` random inputs of its input shape, with a note. With ``--int8 FILE``
also the int8 QDQ graph onnxruntime runs on its integer kernels (``compress.export.int8``),
activation ranges calibrated on ``--calibration`` training images; it reports the integer
kernels a default session runs and the accuracy of both graphs on the first
``--check-images`` test images. Exit status 2 on bad input (one ``error:`` line), 1 if an
onnxruntime check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import torch
import yaml

from compress.checkpoint import Checkpoint, atomic_write, load_checkpoint
from compress.export.artifact import SUFFIX, reference, save, size_report

CIFAR10_SHAPE = (3, 32, 32)
RANDOM_IMAGES = 256  # the most random inputs the check runs where a dataset's test images are missing
MIN_INT8_AGREEMENT = 0.97  # int8 vs float graph: the least fraction of test images both put in the same class


def checkpoint_file(source: str) -> Path:
    """The checkpoint file of a run dir (its ``model.pt``, else its ``model.cpk``: a published
    run keeps only that) or the file itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "model.pt" if (path / "model.pt").is_file() else path / f"model{SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint (give a run dir holding model.pt or model.cpk, "
                                "or a .pt/.cpk file)")
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path``; for an artifact, with its run's config (``metrics.json`` beside
    it, if there is one: what the ONNX check reads its data from)."""
    try:
        ckpt = load_checkpoint(str(path))
    except ValueError as e:
        reason = str(e).splitlines()[0]  # torch's unpickling errors run over many lines
        raise ValueError(f"{path}: cannot read the checkpoint ({reason})") from None
    metrics = path.parent / "metrics.json"
    if path.suffix == SUFFIX and metrics.is_file():
        config = json.loads(metrics.read_text()).get("config")
        if isinstance(config, dict):
            ckpt.meta["config"] = config
    return ckpt


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


def data_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's data config: the ``data`` section of ``meta["config"]`` (a dict or the
    YAML ``compress.train`` saves), else ``meta["data"]``; None for neither (older checkpoints)."""
    meta = ckpt.meta or {}
    config = meta.get("config")
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError:
            config = None
    section = config.get("data") if isinstance(config, Mapping) else None
    section = section if isinstance(section, Mapping) else meta.get("data")
    return dict(section) if isinstance(section, Mapping) else None


def _test_images(count: int, data: str | None, ckpt: Checkpoint) -> torch.Tensor | None:
    """The first ``count`` test images of the checkpoint's dataset (None for 0): CIFAR-10's from
    the root ``data`` (default ``$COMPRESS_DATA``), another dataset's from
    ``compress.verify.test_tensors`` (root: ``data``, default the config's; or random, see
    :func:`_other_images`)."""
    if not count:
        return None
    from compress.data import MEAN, STD, is_cifar10

    cfg, shape = data_config(ckpt), _onnx_module().image_shape(ckpt)
    if not is_cifar10(cfg) or shape != CIFAR10_SHAPE:
        return _other_images(count, data, cfg or {}, shape)
    data = data or os.environ.get("COMPRESS_DATA")
    if not data:
        raise ValueError("--onnx checks onnxruntime on CIFAR-10 test images: set COMPRESS_DATA or --data to a "
                         "CIFAR-10 root (or --check-images 0 to skip the check)")
    from compress.verify import test_set

    cfg = cfg or {}
    return test_set(Path(data), cfg.get("mean", MEAN), cfg.get("std", STD))[0][:count]


def _other_images(count: int, data: str | None, cfg: dict[str, Any], shape: tuple[int, int, int]) -> torch.Tensor:
    """The first ``count`` test images of the dataset ``cfg`` (``compress.verify.test_tensors``
    with root ``data``, None: the config's); where that function, the data or the config's
    ``_target_`` (a bare ``meta["data"]``) is missing, at most :data:`RANDOM_IMAGES` seeded
    random inputs of ``shape``, with a printed note."""
    try:
        if "_target_" not in cfg:
            raise ValueError("the checkpoint's data config names no _target_")
        from compress.verify import test_tensors

        return test_tensors(cfg, data)[0][:count]
    except (ImportError, OSError, ValueError) as e:
        n = min(count, RANDOM_IMAGES)
        print(f"note: no test images of {cfg.get('_target_', 'this dataset')} ({type(e).__name__}: {e}); "
              f"checking onnxruntime on {n} random {'x'.join(map(str, shape))} inputs instead")
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


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


def export_int8(ckpt: Checkpoint, out: Path, count: int, method: str, data: str | None, check: int) -> bool:
    """Write the int8 QDQ graph of ``ckpt`` to ``out`` (ranges calibrated on ``count`` training
    images by ``method``), print what it holds and the kernels onnxruntime runs, and its
    accuracy beside the float graph's on ``check`` test images; returns whether every
    convolution runs as ``QLinearConv`` and the two agree on at least :data:`MIN_INT8_AGREEMENT`."""
    from compress.export.int8 import fused_ops, to_int8
    from compress.verify import calibration_images, test_tensors

    onnx_model, cfg = _onnx_module(), data_config(ckpt)
    graph = to_int8(ckpt, calibration_images(cfg, count, data), method)
    atomic_write(out, lambda f: f.write(graph.proto.SerializeToString()))
    ops = fused_ops(out)
    convs = len(graph.exact) + len(graph.requantized)
    print(f"wrote {out}")
    print(f"  onnx_bytes        {out.stat().st_size:>10,}")
    print(f"  quantized         {graph.describe()} (ranges: {method} on {count} training images)")
    print(f"  onnxruntime runs  {ops['QLinearConv']} of {convs} convs as QLinearConv, {ops['QLinearAdd']} QLinearAdd")
    ok = ops["QLinearConv"] == convs
    if check:
        x, y = (t[:check] for t in test_tensors(cfg or {}, data))
        float_graph = onnx_model.session(onnx_model.to_onnx(ckpt).proto)
        int8_graph = onnx_model.session(out)
        p_float, p_int8 = (_predictions(s, x) for s in (float_graph, int8_graph))
        agree = float((p_float == p_int8).float().mean())
        print(f"  accuracy          int8 {float((p_int8 == y).float().mean()):.4f}, float "
              f"{float((p_float == y).float().mean()):.4f} on {len(y)} test images (same class {agree:.2%})")
        ok = ok and agree >= MIN_INT8_AGREEMENT
    return ok


def _predictions(sess: Any, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The class onnxruntime session ``sess`` predicts for each image of ``x``."""
    return torch.cat([torch.from_numpy(sess.run(["logits"], {"images": x[i:i + batch].float().contiguous().numpy()})[0])
                      .argmax(1) for i in range(0, len(x), batch)])


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use an integer >= 0")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m compress.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run dir (holding model.pt, or a published one holding model.cpk) or checkpoint file")
    parser.add_argument("-o", "--output", help=f"artifact path (default: next to the checkpoint, *{SUFFIX})")
    parser.add_argument("--fp16", action="store_true", help="store unquantized floats as float16 (the artifact only)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing artifact at the default path")
    parser.add_argument("--onnx", type=Path, metavar="FILE", help="also write the network as ONNX and check it")
    parser.add_argument("--check-images", type=_count, default=10_000, metavar="N",
                        help="test images the onnxruntime check runs (default: 10000, all; 0: no check)")
    parser.add_argument("--int8", type=Path, metavar="FILE",
                        help="also write the int8 QDQ graph onnxruntime runs on integer kernels, and check it")
    parser.add_argument("--calibration", type=_count, default=1024, metavar="N",
                        help="training images the int8 activation ranges are calibrated on (default 1024)")
    parser.add_argument("--calibration-method", choices=("mse", "minmax"), default="mse",
                        help="int8 activation ranges: least squared error (default) or min/max")
    parser.add_argument("--data", help="data root for the check (CIFAR-10: default $COMPRESS_DATA; "
                                       "another dataset: default its config's root)")
    args = parser.parse_args(argv)
    try:
        path = checkpoint_file(args.source)
        ckpt = read_checkpoint(path)
        images = None
        if args.onnx or args.int8:  # fail before writing anything: the extra is missing, or the test images
            _onnx_module()
        if args.int8 and not args.calibration:
            raise ValueError("--calibration 0 is not allowed with --int8: its activation ranges need training images")
        if args.onnx:
            images = _test_images(args.check_images, args.data, ckpt)
        out = Path(args.output) if args.output else path.with_suffix(SUFFIX)
        fp_dtype = "float16" if args.fp16 else "float32"
        if out.exists() and not args.output and not args.force:
            if not (args.onnx or args.int8):  # the run's own artifact, described by its metrics.json
                raise ValueError(f"{out} exists (the run's own artifact): give -o FILE for a new one, or --force to overwrite it")
            report = size_report(ckpt, fp_dtype) | {"compressed_bytes": out.stat().st_size}  # the file as it is
            print(f"kept {out} (exists; --force rewrites it)")
        else:
            report = save(ckpt, out, fp_dtype)
            _print_size(out, report)
        ok = export_onnx(ckpt, args.onnx, report, images) if args.onnx else True
        if args.int8:
            ok = export_int8(ckpt, args.int8, args.calibration, args.calibration_method, args.data,
                             args.check_images) and ok
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1
