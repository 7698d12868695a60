"""Inference speed and accuracy of every deployable form of a CIFAR ResNet, side by side.

    python benchmarks/inference.py [--arch resnet20] [--channel RUN_DIR ...] [--compressed RUN_DIR ...]
                                   [--repeats 5] [--latency-runs 200] [--images 10000] [--out FILE.md]

Variants (all from one dense model: the published weights ``model=<arch>`` loads):

- PyTorch eager fp32 (``torch.inference_mode``, eval);
- our dense ONNX and our compressed ONNX (``--compressed``: a run dir, e.g. 80% global + asym
  4-bit; ``python -m compress.export RUN --onnx``), in default onnxruntime sessions; a
  ``quant=sym`` run also as our int8 ONNX (its own codes, and its activation ranges where it
  learned them: ``quant.abits=8``);
- our int8 ONNX of the dense model (``--int8``: ``compress.export.int8``, ranges on 1,024
  training images);
- onnxruntime's own ``quantize_static`` of the dense ONNX: QDQ, uint8 activations, int8
  weights per channel, MinMax ranges on 256 training images (``--ort-reduce-range`` adds its
  ``reduce_range=True`` variant);
- channel-pruned networks, fp32 and int8: ``--channel RUN_DIR`` (fine-tuned, e.g. the published
  ``experiment=channel`` run; repeatable) and ``--macs 2,4`` (pruned here from the dense model
  with ``prune=channel``'s defaults or ``--scope``, ``--importance`` and ``--round-to N``: channel
  counts a multiple of N) and ``--widths 16,8,8`` (each stage's blocks keep that many inner
  channels, as ``experiment=channel_kernels``), *not* fine-tuned: their accuracy is not a
  result, their speed is).

Every engine runs on one thread (``torch.set_num_threads(1)``, ``intra_op_num_threads=1``,
otherwise default session options, as a user loads a file). Throughput: batches of 256, the
variants interleaved within each of ``--repeats`` rounds, median images/s and the median of the
per-round ratios to PyTorch and to our dense ONNX. Latency: batch 1, ``--latency-runs`` runs per
variant interleaved in rounds of 10, median ms. Accuracy: every test image (``--images``).
Needs the ``onnx`` and ``channel`` extras; data and weights from ``$COMPRESS_DATA`` /
``$COMPRESS_PRETRAINED`` (or beside it).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from compress.channels import IMPORTANCES, SCOPES, ChannelPruning, count_macs
from compress.checkpoint import Checkpoint, load_checkpoint
from compress.export.artifact import reference
from compress.export.cli import checkpoint_file, read_checkpoint
from compress.export.int8 import to_int8
from compress.export.onnx_model import to_onnx
from compress.models import ARCHS, build
from compress.models.weights import published_weights
from compress.verify import calibration_images, cifar10_root, test_set

BATCH = 256


@dataclass
class Variant:
    """One deployable form: a way to run a batch, its file size, MACs and accuracy."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    bytes: int | None = None
    macs: int | None = None
    note: str = ""
    accuracy: float = float("nan")
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def ort_runner(proto: onnx.ModelProto) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """A default one-thread onnxruntime session of ``proto`` (as loaded from its file), and the file's size."""
    blob = proto.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return (lambda x: sess.run(["logits"], {"images": x})[0]), len(blob)


def torch_runner(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    model = model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return run


class _Reader(CalibrationDataReader):
    """onnxruntime's calibration input: the images one batch of 32 at a time."""

    def __init__(self, images: torch.Tensor) -> None:
        self.batches = iter([{"images": images[i:i + 32].numpy()} for i in range(0, len(images), 32)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def ort_quantize_static(proto: onnx.ModelProto, images: torch.Tensor, reduce_range: bool) -> onnx.ModelProto:
    """onnxruntime's post-training static quantization of ``proto`` (QDQ, U8 activations, S8
    per-channel weights, MinMax), after its recommended pre-processing (shape inference, BN folding)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(out), _Reader(images), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
        return onnx.load(out)


def channel_pruned(dense: nn.Module, speedup: float, round_to: int | None, scope: str = "local",
                   importance: str = "l1") -> nn.Module:
    """``dense`` with whole channels removed to ``1/speedup`` of its MACs (``prune=channel``
    with these options), not fine-tuned."""
    model = copy.deepcopy(dense)
    ChannelPruning(macs_speedup=speedup, round_to=round_to, scope=scope, importance=importance).prune(model)
    return model.eval()


def width_pruned(dense: nn.Module, widths: tuple[int, ...]) -> nn.Module:
    """``dense`` with every residual block of stage ``i`` keeping ``widths[i]`` inner channels
    (``prune=channel`` with ``layer_ratio``), not fine-tuned."""
    model = copy.deepcopy(dense)
    full = [getattr(model, f"layer{i + 1}")[0].conv1.out_channels for i in range(len(widths))]
    if any(w > f for w, f in zip(widths, full)):
        raise ValueError(f"--widths {','.join(map(str, widths))} is not allowed: the stages have "
                         f"{','.join(map(str, full))} inner channels, keep at most that many")
    ratios = {rf"re:layer{i + 1}\.\d+\.conv1": 1 - w / f for i, (w, f) in enumerate(zip(widths, full)) if w < f}
    if ratios:
        ChannelPruning(macs_speedup=None, layer_ratio=ratios, layers={"include": list(ratios)}).prune(model)
    return model.eval()


def stage_widths(text: str) -> tuple[int, ...]:
    """``--widths``: three positive channel counts, e.g. ``16,8,8``."""
    try:
        widths = tuple(int(s) for s in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--widths {text!r} is not allowed: use three positive channel counts, "
                                         "one per stage, e.g. 16,8,8")
    return widths


def checkpoint_of(model: nn.Module) -> Checkpoint:
    return Checkpoint(model.state_dict(), {}, {"resized": True})


def variants(a: argparse.Namespace, calib: torch.Tensor) -> list[Variant]:
    """Every variant the arguments ask for, built and loaded."""
    example = torch.zeros(1, 3, 32, 32)
    dense = build(a.arch)
    dense.load_state_dict(load_checkpoint(published_weights(a.arch)).state_dict)
    dense.eval()
    dense_ckpt = Checkpoint(dense.state_dict(), {}, {})
    macs = count_macs(dense, example)[0]
    out = [Variant("PyTorch eager fp32", torch_runner(dense), macs=macs)]

    def onnx_variant(name: str, proto: onnx.ModelProto, variant_macs: int | None, note: str = "") -> Variant:
        run, size = ort_runner(proto)
        return Variant(name, run, size, variant_macs, note)

    out.append(onnx_variant("ONNX fp32 (ours), dense", to_onnx(dense_ckpt).proto, macs))
    for run in a.compressed:
        ckpt = read_checkpoint(checkpoint_file(run))
        out.append(onnx_variant("ONNX compressed (ours)", to_onnx(ckpt).proto, macs, Path(run).name))
        if (ckpt.meta.get("quant") or {}).get("mode") == "sym":  # its own codes (and activation ranges) in int8
            out.append(onnx_variant("ONNX int8 (ours), compressed", to_int8(ckpt, calib).proto, macs, Path(run).name))
    out.append(onnx_variant("ONNX int8 (ours), dense", to_int8(dense_ckpt, calib).proto, macs))
    fp_proto = to_onnx(dense_ckpt).proto
    for reduce in (False, True) if a.ort_reduce_range else (False,):
        out.append(onnx_variant(f"onnxruntime quantize_static{' reduce_range' if reduce else ''}, dense",
                                ort_quantize_static(fp_proto, calib[:256], reduce), macs, "QDQ U8S8 per channel, MinMax, 256 images"))
    pruned: list[tuple[str, Checkpoint, nn.Module, str]] = []
    for run in a.channel:
        ckpt = read_checkpoint(checkpoint_file(run))
        model = reference(ckpt)
        model.load_state_dict(ckpt.state_dict)
        pruned.append((f"channel {macs / count_macs(model, example)[0]:.2f}x", ckpt, model.eval(),
                       f"fine-tuned: {Path(run).name}"))
    for speedup in a.macs:
        model = channel_pruned(dense, speedup, a.round_to, a.scope, a.importance)
        pruned.append((f"channel {macs / count_macs(model, example)[0]:.2f}x", checkpoint_of(model), model,
                       "not fine-tuned"))
    for widths in a.widths:
        model = width_pruned(dense, widths)
        pruned.append((f"widths {','.join(map(str, widths))} {macs / count_macs(model, example)[0]:.2f}x",
                       checkpoint_of(model), model, "not fine-tuned"))
    for name, ckpt, model, note in pruned:
        m = count_macs(model, example)[0]
        out.append(Variant(f"PyTorch eager fp32, {name}", torch_runner(model), macs=m, note=note))
        out.append(onnx_variant(f"ONNX fp32 (ours), {name}", to_onnx(ckpt).proto, m, note))
        out.append(onnx_variant(f"ONNX int8 (ours), {name}", to_int8(ckpt, calib).proto, m, note))
    return out


def measure(vs: list[Variant], x: torch.Tensor, y: torch.Tensor, a: argparse.Namespace) -> None:
    """Accuracy on every test image, then interleaved throughput and latency rounds."""
    for v in vs:
        hits = sum(int((v.run(x[i:i + 500].numpy()).argmax(1) == y[i:i + 500].numpy()).sum()) for i in range(0, len(x), 500))
        v.accuracy = hits / len(x)
        print(f"  accuracy {v.accuracy:.4f}  {v.name}", flush=True)
    batch, single = x[:BATCH].numpy(), x[:1].numpy()
    for v in vs:  # warm-up
        v.run(batch), v.run(single)
    for r in range(a.repeats):
        for v in vs:
            t0 = time.perf_counter()
            v.run(batch)
            v.rates.append(BATCH / (time.perf_counter() - t0))
        print(f"  throughput round {r + 1}/{a.repeats} done", flush=True)
    for _ in range(max(1, a.latency_runs // 10)):
        for v in vs:
            for _ in range(10):
                t0 = time.perf_counter()
                v.run(single)
                v.latencies.append(1000 * (time.perf_counter() - t0))


def table(vs: list[Variant]) -> str:
    """The results as a Markdown table."""
    eager, dense = vs[0], vs[1]

    def ratio(v: Variant, base: Variant) -> float:
        return statistics.median(a / b for a, b in zip(v.rates, base.rates))

    rows = ["| variant | MACs | file bytes | accuracy | batch-256 img/s | vs PyTorch | vs dense ONNX | batch-1 ms | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for v in vs:
        rows.append(f"| {v.name} | {v.macs / 1e6:.1f} M | {f'{v.bytes:,}' if v.bytes else '—'} | {v.accuracy:.4f} | "
                    f"{statistics.median(v.rates):.0f} | {ratio(v, eager):.2f} | {ratio(v, dense):.2f} | "
                    f"{statistics.median(v.latencies):.2f} | {v.note} |")
    return "\n".join(rows)


def host() -> str:
    """The CPU model and the instruction sets that matter for int8 and bf16."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
        flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    except OSError:
        model, flags = platform.processor() or "?", []
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'}), {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs"


def load() -> str:
    """The machine's 1-minute load average (other processes share the CPUs: compare ratios)."""
    try:
        return f"load average {os.getloadavg()[0]:.2f}"
    except OSError:
        return "load average unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20", choices=ARCHS)
    p.add_argument("--compressed", action="append", default=[],
                   help="a run dir whose model.cpk is a compressed variant (repeatable; quant=sym runs also in int8)")
    p.add_argument("--channel", action="append", default=[],
                   help="a channel-pruned, fine-tuned run dir (experiment=channel; repeatable)")
    p.add_argument("--macs", default="2,4", help="MAC reductions to prune to here, not fine-tuned (default 2,4; '' none)")
    p.add_argument("--round-to", type=int, help="channel counts of --macs variants a multiple of this (e.g. 8)")
    p.add_argument("--scope", default="local", choices=SCOPES, help="prune.scope of the --macs variants (default local)")
    p.add_argument("--importance", default="l1", choices=IMPORTANCES,
                   help="prune.importance of the --macs variants (default l1)")
    p.add_argument("--widths", action="append", default=[], type=stage_widths,
                   help="inner channels each stage's blocks keep, e.g. 16,8,8 (not fine-tuned; repeatable)")
    p.add_argument("--ort-reduce-range", action="store_true", help="also onnxruntime's reduce_range=True variant")
    p.add_argument("--repeats", type=int, default=5, help="throughput rounds (default 5)")
    p.add_argument("--latency-runs", type=int, default=200, help="batch-1 runs per variant (default 200)")
    p.add_argument("--images", type=int, default=10_000, help="test images for accuracy (default all 10000)")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    a = p.parse_args(argv)
    a.macs = [float(s) for s in a.macs.split(",") if s.strip()]
    torch.set_num_threads(1)
    root = cifar10_root(None)
    x, y = (t[:a.images] for t in test_set(root))
    calib = calibration_images(None, 1024, root)
    head = (f"{a.arch}, {host()}; torch {torch.__version__}, onnxruntime {ort.__version__}; "
            f"{a.repeats} throughput rounds, {a.latency_runs} batch-1 runs, accuracy on {len(y)} test images")
    print(head, flush=True)
    try:
        vs = variants(a, calib)
    except ValueError as e:
        p.error(str(e))
    before = load()
    measure(vs, x.contiguous(), y, a)
    result = f"{head}; {before} before the rounds, {load()} after\n\n{table(vs)}\n"
    print(result)
    if a.out:
        a.out.write_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
