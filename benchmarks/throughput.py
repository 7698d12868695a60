"""Training and evaluation throughput of ``compress`` against a plain PyTorch loop.

    .venv/bin/python benchmarks/throughput.py [--steps 40] [--warmup 5] [--repeats 3] [--threads N]
                                              [--device cpu|cuda] [--compile] [--real] [--distill]

Trains ResNet-20 with batch 128 on CIFAR-10-shaped uint8 data (random; ``--real`` reads the
torchvision CIFAR-10 root in ``$COMPRESS_DATA``) several ways, interleaved in one process
(a, b, c, d, e, a, b, ...) so that a background load hits every variant alike:

  (a) a hand-written PyTorch loop in fp32: SGD + per-step cosine LambdaLR, ``compress.data`` augmentation;
  (b) ``compress.module.Classifier`` through a Trainer configured like ``conf/trainer/cpu.yaml``, fp32;
  (c) (b) with 80% global pruning masks and 4-bit asym fake quantization installed;
  (d), (e): (b), (c) under bf16 autocast (``precision=bf16-mixed``, the CPU default where the
  CPU has native bf16). On ``--device cuda`` every Lightning variant is bf16 and (d), (e) are skipped;
  (f), (g) (``--distill``): (e) distilling from a ResNet-20 / a ResNet-56 teacher (its extra forward).

Each variant runs ``warmup + steps`` steps from the same loader; only the last ``steps`` are
timed (from the start of the first timed batch, once it is loaded, to the end of the last
step). Evaluation (10k images, ``data.eval_batch_size=auto``) is timed the same way: ``trainer.test`` of the
Classifier against a ``torch.inference_mode`` loop. Ratios are medians of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from compress.config import cpu_precision
from compress.data import CIFAR10Data, TensorBatches, check_root, load_split, resolve_eval_batch
from compress.distill import Teacher
from compress.models import build, resnet20
from compress.module import Classifier, CompileNetwork
from compress.prune import PruningCallback
from compress.quant import QuantizationCallback

BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
TARGETS = {"b/a": 0.95, "c/b": 0.85, "bf16": 1.5, "eval": 1500.0, "rss_gib": 2.5}


# ----------------------------------------------------------------------------- data


def load_data(real: bool, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train (50k) and test (10k) splits as uint8 images and int64 labels on ``device``."""
    if real:
        root = Path(os.environ.get("COMPRESS_DATA", "data/cifar10")).expanduser()
        try:
            check_root(root)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err} (--real reads $COMPRESS_DATA)") from None
        train, test = load_split(root, train=True), load_split(root, train=False)
    else:
        gen = torch.Generator().manual_seed(0)
        train = (torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=gen),
                 torch.randint(0, 10, (50_000,), generator=gen))
        test = (torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=gen),
                torch.randint(0, 10, (10_000,), generator=gen))
    return {"train": tuple(t.to(device) for t in train), "test": tuple(t.to(device) for t in test)}


def datamodule(splits: dict[str, tuple[torch.Tensor, torch.Tensor]], device: str) -> CIFAR10Data:
    """The project's data module over the given tensors (no validation split)."""
    dm = CIFAR10Data(batch_size=BATCH, eval_batch_size="auto", val_size=0, seed=0, device=device)
    dm.splits = {"train": splits["train"], "test": splits["test"]}  # setup() is a no-op once filled
    return dm


# ----------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer(pl.Callback):
    """Seconds from the start of training batch ``first`` to the end of batch ``last``, and
    from the start to the end of testing (after the Trainer's setup in both cases)."""

    def __init__(self, device: str, first: int = 0, last: int = -1) -> None:
        self.device, self.first, self.last = device, first, last
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.first:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.last:
            sync(self.device)
            self.t1 = time.perf_counter()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(self.device)
        self.t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


# ----------------------------------------------------------------------------- variants


def cosine(total: int) -> Callable[[int], float]:
    """The per-step factor ``compress.module.Classifier`` gives LambdaLR (no warm-up)."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def train_plain(args: argparse.Namespace, splits: dict) -> float:
    """(a) Seconds for ``args.steps`` steps of a hand-written loop, after ``args.warmup`` steps."""
    device, total = args.device, args.warmup + args.steps
    model = resnet20().to(device)  # as Classifier gets it: parameters contiguous, inputs channels_last
    if args.compile:
        model.compile()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(total))
    loader = TensorBatches(*splits["train"], BATCH, train=True, seed=0)
    model.train()
    t0 = 0.0
    for i, (x, y) in enumerate(loader):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if i == total - 1:
            break
    sync(device)
    return time.perf_counter() - t0


def trainer(args: argparse.Namespace, callbacks: list[pl.Callback], bf16: bool = False, **kwargs) -> pl.Trainer:
    """A Trainer set up like ``conf/trainer/cpu.yaml``, in fp32 or bf16 autocast (always bf16 on cuda)."""
    return pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if bf16 or args.device == "cuda" else "32-true", deterministic=True, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, **kwargs,
    )


def compression() -> list[pl.Callback]:
    return [PruningCallback(0.8, "global", ramp_epochs=0), QuantizationCallback("asym", 4)]


def train_lightning(args: argparse.Namespace, splits: dict, compressed: bool, bf16: bool = False,
                    teacher_arch: str | None = None) -> float:
    """(b)-(g) Seconds for the timed steps of ``Classifier`` fitted by a Trainer (distilling
    from a ``teacher_arch`` network if given)."""
    total = args.warmup + args.steps
    timer = Timer(args.device, first=args.warmup, last=total - 1)
    callbacks = [*(compression() if compressed else []), *([CompileNetwork()] if args.compile else []), timer]
    teacher = Teacher(build(teacher_arch), 0.9, 4.0) if teacher_arch else None
    module = Classifier(resnet20(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, teacher=teacher)
    fit = trainer(args, callbacks, bf16, max_epochs=1, limit_train_batches=total, limit_val_batches=0)
    fit.fit(module, datamodule=datamodule(splits, args.device))
    return timer.seconds


def eval_plain(args: argparse.Namespace, splits: dict, model: nn.Module) -> float:
    """Seconds for a ``torch.inference_mode`` pass over the test set (accuracy computed)."""
    model.eval()
    loader = TensorBatches(*splits["test"], resolve_eval_batch("auto", torch.device(args.device)), train=False)
    sync(args.device)
    t0 = time.perf_counter()
    correct = torch.zeros((), dtype=torch.int64, device=args.device)
    with torch.inference_mode(), torch.autocast(args.device, torch.bfloat16, enabled=args.device == "cuda"):
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum()
    correct.item()
    sync(args.device)
    return time.perf_counter() - t0


def eval_lightning(args: argparse.Namespace, splits: dict, model: nn.Module, compressed: bool) -> float:
    """Seconds of ``trainer.test`` on the Classifier (after the Trainer's setup)."""
    timer = Timer(args.device)
    test = trainer(args, [*(compression() if compressed else []), timer])
    test.test(Classifier(model), datamodule=datamodule(splits, args.device), verbose=False)
    return timer.seconds


# ----------------------------------------------------------------------------- report


def row(name: str, values: list[float]) -> str:
    return f"  {name:<34}" + "".join(f"{v:9.0f}" for v in values) + f" | {statistics.median(values):7.0f} {max(values):6.0f}"


def check(name: str, value: float, target: float, unit: str = "", higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    op = ">=" if higher else "<="
    shown = f"{value:9.0f}" if value >= 100 else f"{value:9.3f}"
    return f"  {name:<34}{shown}{unit}  target {op} {target:g}{unit}  {'PASS' if ok else 'FAIL'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per variant and repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps before them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network in every training variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--real", action="store_true", help="real CIFAR-10 from $COMPRESS_DATA")
    parser.add_argument("--distill", action="store_true", help="also (f): (e) + distill=kd, the teacher's extra forward, "
                        "and (g): (f) with distill.teacher=resnet56")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as Lightning sets it for deterministic=True
    torch.use_deterministic_algorithms(True)  # what deterministic=True sets, process-wide, for every variant
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*(does not have many workers|smaller than the logging interval).*")

    splits = load_data(args.real, args.device)
    train = {
        "(a) plain PyTorch loop": lambda: train_plain(args, splits),
        "(b) compress (Lightning)": lambda: train_lightning(args, splits, compressed=False),
        "(c) compress + prune 80% + asym q4": lambda: train_lightning(args, splits, compressed=True),
    }
    # bf16 on a CPU without native bf16 is emulated, many times slower than fp32: not run there
    # (the trainer's default precision there is fp32 too, see compress.config.cpu_precision)
    native_bf16 = args.device == "cpu" and cpu_precision() == "bf16-mixed"
    if native_bf16:
        train["(d) (b) in bf16 autocast"] = lambda: train_lightning(args, splits, compressed=False, bf16=True)
        train["(e) (c) in bf16 autocast"] = lambda: train_lightning(args, splits, compressed=True, bf16=True)
    elif args.device == "cpu":
        print("(d), (e) skipped: this CPU has no native bf16 (AVX-512 BF16 or AMX), so training runs in fp32")
    if args.distill:
        bf16 = native_bf16
        train["(f) (e) + distill=kd"] = lambda: train_lightning(args, splits, True, bf16, "resnet20")
        train["(g) (f), ResNet-56 teacher"] = lambda: train_lightning(args, splits, True, bf16, "resnet56")
    plain_model, q_model = resnet20().to(args.device), resnet20().to(args.device)
    evals = {
        "plain torch.inference_mode": lambda: eval_plain(args, splits, plain_model),
        "compress trainer.test": lambda: eval_lightning(args, splits, plain_model, compressed=False),
        "compress trainer.test, prune+q4": lambda: eval_lightning(args, splits, q_model, compressed=True),
    }
    train_ips: dict[str, list[float]] = {k: [] for k in train}
    eval_ips: dict[str, list[float]] = {k: [] for k in evals}
    n_test = len(splits["test"][1])
    for _ in range(args.repeats):
        for name, run in train.items():
            train_ips[name].append(args.steps * BATCH / run())
        for name, run in evals.items():
            eval_ips[name].append(n_test / run())

    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    a, b, c = (train_ips[k] for k in list(train_ips)[:3])
    ratio_ba = statistics.median(y / x for x, y in zip(a, b))
    ratio_cb = statistics.median(y / x for x, y in zip(b, c))
    eval_compress = statistics.median(eval_ips["compress trainer.test"])

    print(f"torch {torch.__version__}, lightning {pl.__version__}, python {platform.python_version()}, "
          f"device {args.device}, threads {torch.get_num_threads()}, compile {args.compile}")
    print(f"data {'CIFAR-10' if args.real else 'synthetic uint8'}, batch {BATCH}, {args.steps} timed steps "
          f"(+{args.warmup} warm-up), {args.repeats} interleaved repeats\n")
    print(f"train images/s{'':<22}" + "".join(f"{'rep ' + str(i + 1):>9}" for i in range(args.repeats)) + " |  median   best")
    for name, values in train_ips.items():
        print(row(name, values))
    print(f"eval images/s ({n_test} images, batch {resolve_eval_batch('auto', torch.device(args.device))})")
    for name, values in eval_ips.items():
        print(row(name, values))
    best_ba, best_cb = max(b) / max(a), max(c) / max(b)
    print(f"\nratios of the best repeats (less sensitive to load bursts): (b)/(a) {best_ba:.3f}, (c)/(b) {best_cb:.3f}")
    print("targets (ratios: median of per-repeat ratios)")
    print(check("(b)/(a) train", ratio_ba, TARGETS["b/a"]))
    print(check("(c)/(b) train", ratio_cb, TARGETS["c/b"]))
    if native_bf16:
        d, e = train_ips["(d) (b) in bf16 autocast"], train_ips["(e) (c) in bf16 autocast"]
        print(check("(d)/(b) train, bf16 / fp32", statistics.median(y / x for x, y in zip(b, d)), TARGETS["bf16"]))
        print(check("(e)/(c) train, bf16 / fp32, compressed", statistics.median(y / x for x, y in zip(c, e)), TARGETS["bf16"]))
    if args.distill:
        base = train_ips["(e) (c) in bf16 autocast" if native_bf16 else "(c) compress + prune 80% + asym q4"]
        f = train_ips["(f) (e) + distill=kd"]
        g = train_ips["(g) (f), ResNet-56 teacher"]
        print(f"  {'(f)/(e) train, distillation cost':<34}{statistics.median(y / x for x, y in zip(base, f)):9.3f}"
              "  (the teacher's forward per step)")
        print(f"  {'(g)/(e) train, ResNet-56 teacher':<34}{statistics.median(y / x for x, y in zip(base, g)):9.3f}"
              "  (its deeper forward per step)")
    print(check("eval, compress trainer.test", eval_compress, TARGETS["eval"], " img/s"))
    print(check("peak RSS", rss_gib, TARGETS["rss_gib"], " GiB", higher=False))


if __name__ == "__main__":
    main()
