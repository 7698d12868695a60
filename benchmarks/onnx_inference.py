"""onnxruntime CPU inference beside PyTorch eval, for ResNet-20 and ResNet-56, in one process.

    .venv/bin/python benchmarks/onnx_inference.py [--images 2000] [--batch 200] [--repeats 3]
                                                  [--threads N] [--archs resnet20,resnet56]

For every model, two networks: the dense fp32 one (the weights ``model=<arch>`` loads where they
are found locally, see ``compress/models/weights.py``, else random ones: throughput does not depend on
the values) and the same one pruned to 80% (global) and quantized to 4-bit sym, baked as
``compress`` saves it. Each runs two ways on the same float32 images, interleaved over the
repeats (torch, onnx, torch, onnx, ...) so that other load on the machine hits both alike:

  torch: a ``torch.inference_mode`` loop over the model in eval mode (fp32);
  onnx:  an onnxruntime CPU session of the graph ``python -m compress.export --onnx`` writes,
         with as many intra-op threads as torch has.

Prints images/s per repeat and the median, and the median of the per-repeat ratios onnx/torch.
Needs the ``onnx`` extra (``pip install -e .[onnx]``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import onnxruntime as ort
import torch
from torch import nn

from compress.checkpoint import Checkpoint, is_url, load_checkpoint
from compress.export.onnx_model import session, to_onnx
from compress.layers import bake
from compress.models import ARCHS, build
from compress.models.weights import published_weights
from compress.prune import PruningCallback, current_masks
from compress.quant import QuantizationCallback


def networks(arch: str) -> tuple[str, dict[str, tuple[nn.Module, Checkpoint]]]:
    """Where the weights came from, and the dense and the pruned + 4-bit network with their checkpoints."""
    source = published_weights(arch)
    dense = build(arch)
    if not is_url(source):
        dense.load_state_dict(load_checkpoint(source).state_dict)
    compressed = build(arch)
    compressed.load_state_dict(dense.state_dict())
    PruningCallback(0.8, "global").install(compressed)
    masks = current_masks(compressed)
    QuantizationCallback("sym", 4).install(compressed)
    bake(compressed)
    return ("pretrained" if not is_url(source) else "random"), {
        "dense fp32": (dense.eval(), Checkpoint(dense.state_dict(), {}, {"quant": None})),
        "global 80% + sym4": (compressed.eval(), Checkpoint(compressed.state_dict(), masks, {"quant": {"mode": "sym", "nbits": 4}})),
    }


def timed(run: Callable[[], None], images: int) -> float:
    """Images per second of one call of ``run``."""
    t0 = time.perf_counter()
    run()
    return images / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="images per timed pass (default 2000)")
    p.add_argument("--batch", type=int, default=200, help="batch size of both engines (default 200, as compress evaluates on a CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--archs", default="resnet20,resnet56", help=f"comma-separated, of {', '.join(ARCHS)}")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    x = torch.randn(a.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [x[i:i + a.batch] for i in range(0, a.images, a.batch)]
    arrays = [b.numpy() for b in batches]
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {a.threads} threads, "
          f"{a.images} images in batches of {a.batch}, {a.repeats} repeats (median)")
    print(f"{'model':<9} {'network':<18} {'weights':<9} {'torch img/s':>11} {'onnx img/s':>11} {'onnx/torch':>10}")
    for arch in a.archs.split(","):
        origin, nets = networks(arch.strip())
        for name, (model, ckpt) in nets.items():
            sess = session(to_onnx(ckpt).proto, a.threads)

            def run_torch() -> None:
                with torch.inference_mode():
                    for b in batches:
                        model(b)

            def run_onnx() -> None:
                for b in arrays:
                    sess.run(["logits"], {"images": b})

            run_torch(), run_onnx()  # warm-up
            rates = [(timed(run_torch, a.images), timed(run_onnx, a.images)) for _ in range(a.repeats)]
            t, o = (statistics.median(r[i] for r in rates) for i in (0, 1))
            ratio = statistics.median(r[1] / r[0] for r in rates)
            print(f"{arch:<9} {name:<18} {origin:<9} {t:>11.0f} {o:>11.0f} {ratio:>10.2f}   "
                  f"(per repeat: {', '.join(f'{r[0]:.0f}/{r[1]:.0f}' for r in rates)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
