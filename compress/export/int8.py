"""Integer inference: a network as an ONNX QDQ graph that onnxruntime runs on its int8 kernels.

``python -m compress.export RUN --int8 FILE`` writes it (see ``cli``). The graph is the float
graph of :func:`compress.export.onnx_model.to_onnx`, rewritten the way onnxruntime's own
quantization tool writes QDQ models, so that onnxruntime fuses ``DequantizeLinear -> Conv ->
QuantizeLinear`` into ``QLinearConv`` and ``DequantizeLinear x 2 -> Add -> QuantizeLinear``
into ``QLinearAdd``:

- BatchNorm is folded into the convolution before it (``w * k``, ``k = gamma / sqrt(var + eps)``
  per output channel).
- Weights of convolutions are int8, one scale per output channel, zero point 0. A weight the
  model quantized ``sym`` (any width up to 8 bits) keeps its own codes: its scale is the
  grid's times ``|k|`` (the codes change sign where ``k`` is negative), so a 4-bit layer still
  has at most 15 levels per channel. An unquantized weight is quantized here (8 bits,
  ``max |w| / 127`` per channel). ``asym`` weights have no integer zero point: refused.
  Biases are int32 at the input's scale times the weight's, as onnxruntime requires.
- Activations are uint8, per tensor: the graph input, and the input and output of every
  convolution and residual ``Add``. A ``Relu`` after a convolution or an ``Add`` is dropped:
  the output's zero point is 0, so the quantizer's clamp is the ReLU. Where the model has its
  own activation quantizers (``quant.abits=8``: the residual blocks' inputs and middles), their
  ranges are used as they are (``step``, zero point 0: the same levels); every other range is
  calibrated on training images (:func:`ranges`: the range with the least squared quantization
  error over a sample of their values, or ``minmax``).
- The classifier (``Gemm``) and anything between pooling and it stay float32.

The graph is checked by onnxruntime itself: :func:`fused_ops` counts the integer kernels a
default session runs.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.checkpoint import Checkpoint
from compress.export.artifact import quant_meta, quantized_weights, reference
from compress.export.grid import QuantSpec, grid_codes
from compress.export.onnx_model import to_onnx

CALIBRATION_METHODS = ("mse", "minmax")
SAMPLE = 100_000  # values of each tensor kept (seeded, per batch) for the range search
SHRINKS = np.linspace(0.3, 1.0, 71)  # candidate ranges, as fractions of the observed one
QUANTIZED_OPS = ("Conv", "Add")  # their inputs and outputs are quantized


@dataclass
class Int8Model:
    """The QDQ graph and what it was made from."""

    proto: onnx.ModelProto
    exact: list[str] = field(default_factory=list)  # conv weights kept as the model's own codes
    requantized: list[str] = field(default_factory=list)  # conv weights quantized to 8 bits here
    from_model: list[str] = field(default_factory=list)  # activations quantized with the model's ranges
    calibrated: list[str] = field(default_factory=list)  # activations whose range was calibrated

    def describe(self) -> str:
        """One line: where the weights' and activations' scales come from."""
        return (f"{len(self.exact) + len(self.requantized)} convs int8 per channel ({len(self.exact)} with the model's "
                f"own codes, {len(self.requantized)} quantized here); {len(self.from_model) + len(self.calibrated)} "
                f"activations uint8 ({len(self.from_model)} with the model's ranges, {len(self.calibrated)} calibrated); "
                "classifier float32")


class _Graph:
    """A mutable view of an ONNX graph: nodes, initializers as arrays, value renames."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = [_copy(n) for n in graph.node]
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.inputs = [i.name for i in graph.input]
        self.outputs = [o.name for o in graph.output]

    def copy(self) -> _Graph:
        """A copy whose nodes can be changed without changing these (constants shared)."""
        other = _Graph(onnx.GraphProto())
        other.nodes, other.consts = [_copy(n) for n in self.nodes], dict(self.consts)
        other.inputs, other.outputs = list(self.inputs), list(self.outputs)
        return other

    def producer(self, value: str) -> onnx.NodeProto | None:
        return next((n for n in self.nodes if value in n.output), None)

    def consumers(self, value: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if value in n.input]

    def rename(self, old: str, new: str) -> None:
        """Every reader of ``old`` reads ``new`` instead."""
        for node in self.nodes:
            for i, x in enumerate(node.input):
                if x == old:
                    node.input[i] = new
        self.outputs = [new if o == old else o for o in self.outputs]

    def remove(self, node: onnx.NodeProto) -> None:
        self.nodes = [n for n in self.nodes if n is not node]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _fold_batchnorm(g: _Graph) -> dict[str, np.ndarray]:
    """Fold each BatchNormalization into the Conv that alone feeds it; returns ``k`` per conv
    weight name (how much each output channel was scaled)."""
    scaled = {}
    for bn in [n for n in g.nodes if n.op_type == "BatchNormalization"]:
        conv = g.producer(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(g.consumers(bn.input[0])) != 1 or conv.input[1] not in g.consts:
            continue
        gamma, beta, mean, var = (g.consts[x].astype(np.float64) for x in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = gamma / np.sqrt(var + eps)
        w = g.consts[conv.input[1]]
        g.consts[conv.input[1]] = (w * k.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32)
        bias = g.consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 else np.zeros_like(k)
        bias_name = f"{conv.input[1]}.folded_bias"
        g.consts[bias_name] = ((bias - mean) * k + beta).astype(np.float32)
        conv.input[2:] = [bias_name]
        conv.output[0] = bn.output[0]
        g.remove(bn)
        scaled[conv.input[1]] = k
    return scaled


def _take_activation_quantizers(g: _Graph) -> dict[str, float]:
    """Remove the model's activation fake quantizers (``Div, Clip, Round, Mul`` by one step,
    ``compress.actquant``); returns the step of each value they quantized."""
    steps = {}
    for div in [n for n in g.nodes if n.op_type == "Div" and n.input[1] in g.consts]:
        chain = [div]
        for op in ("Clip", "Round", "Mul"):
            nxt = g.consumers(chain[-1].output[0])
            if len(nxt) != 1 or nxt[0].op_type != op:
                break
            chain.append(nxt[0])
        if len(chain) != 4 or chain[3].input[1] != div.input[1]:
            continue
        if float(g.consts.get(chain[1].input[2], 0)) != 255:
            raise ValueError("--int8: the model's activations are quantized to fewer than 8 bits (quant.abits < 8), "
                             "which uint8 levels would not clamp: export a model with quant.abits=8 or null")
        x = div.input[0]
        steps[x] = float(g.consts[div.input[1]])
        g.rename(chain[3].output[0], x)
        for node in chain:
            g.remove(node)
    return steps


def _drop_relus(g: _Graph, steps: dict[str, float]) -> set[str]:
    """Drop each Relu that alone reads a Conv's or Add's output (the uint8 quantizer with zero
    point 0 clamps as it did); returns those outputs (non-negative once quantized)."""
    clamped = set()
    for relu in [n for n in g.nodes if n.op_type == "Relu"]:
        x = relu.input[0]
        src = g.producer(x)
        if src is None or src.op_type not in QUANTIZED_OPS or len(g.consumers(x)) != 1 or relu.output[0] in g.outputs:
            continue
        g.rename(relu.output[0], x)
        if relu.output[0] in steps:
            steps[x] = steps.pop(relu.output[0])
        g.remove(relu)
        clamped.add(x)
    return clamped


def _points(g: _Graph) -> list[str]:
    """The activations to quantize: the inputs and outputs of every Conv and Add (not constants)."""
    seen: dict[str, None] = {}
    for node in g.nodes:
        if node.op_type in QUANTIZED_OPS:
            for x in [*node.input[:1 if node.op_type == "Conv" else 2], node.output[0]]:
                if x and x not in g.consts:
                    seen[x] = None
    return list(seen)


def _proto(g: _Graph, like: onnx.ModelProto, outputs: list[str] | None = None) -> onnx.ModelProto:
    """The graph as a model (opset and inputs of ``like``), with ``outputs`` as extra outputs."""
    extra = [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in outputs or []]
    used = {x for n in g.nodes for x in n.input}
    graph = helper.make_graph(g.nodes, like.graph.name, list(like.graph.input), [*like.graph.output, *extra],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in g.consts.items() if k in used])
    return helper.make_model(graph, opset_imports=list(like.opset_import), producer_name="compress")


def ranges(model: onnx.ModelProto, values: list[str], images: torch.Tensor, nonneg: set[str],
           method: str = "mse", batch: int = 128) -> dict[str, tuple[float, int]]:
    """``(scale, zero_point)`` of uint8 quantization of each of ``values``, from running
    ``model`` on ``images``: ``minmax``, the observed range; ``mse``, of the observed range
    shrunk by each of :data:`SHRINKS`, the one whose quantization of a seeded sample of the
    values has the least squared error. ``nonneg`` values start at 0 (zero point 0)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} is not allowed: use one of {', '.join(CALIBRATION_METHODS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # values as the float graph has them
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    lo, hi = defaultdict(lambda: np.inf), defaultdict(lambda: -np.inf)
    samples: dict[str, list[np.ndarray]] = defaultdict(list)
    per_batch = max(1, SAMPLE * batch // max(len(images), 1))
    for i in range(0, len(images), batch):
        outs = sess.run(values, {model.graph.input[0].name: images[i:i + batch].float().contiguous().numpy()})
        for name, v in zip(values, outs):
            flat = v.reshape(-1)
            lo[name], hi[name] = min(lo[name], float(flat.min())), max(hi[name], float(flat.max()))
            samples[name].append(rng.choice(flat, min(per_batch, flat.size), replace=False))
    return {name: _best_range(np.concatenate(samples[name]), 0.0 if name in nonneg else min(lo[name], 0.0),
                              max(hi[name], 0.0), method) for name in values}


def _best_range(sample: np.ndarray, lo: float, hi: float, method: str) -> tuple[float, int]:
    """``(scale, zero_point)`` of uint8 levels over ``[lo, hi]`` (0 included), or a shrink of it (``mse``)."""
    best, best_err = None, np.inf
    for shrink in SHRINKS if method == "mse" else (1.0,):
        a, b = lo * shrink, hi * shrink
        scale = max((b - a) / 255, 1e-12)
        zero = int(np.clip(np.round(-a / scale), 0, 255))
        q = (np.clip(np.round(sample / scale) + zero, 0, 255) - zero) * scale
        err = float(np.square(q - sample).sum())
        if err < best_err:
            best, best_err = (float(np.float32(scale)), zero), err
    return best


def to_int8(ckpt: Checkpoint, calibration: torch.Tensor, method: str = "mse") -> Int8Model:
    """The QDQ int8 graph of a baked checkpoint (see the module docstring), activation ranges
    calibrated on ``calibration`` (normalized images); ``ValueError`` for ``asym`` weights."""
    quant = quant_meta(ckpt)
    if quant is not None and quant.mode == "asym":
        raise ValueError("--int8: asym weights (code * scale + min) have no integer zero point: "
                         "export a quant=sym model (its codes are kept) or an unquantized one (quantized to 8 bits here)")
    base = to_onnx(ckpt, codes=False).proto
    quantized = quantized_weights(ckpt, reference(ckpt))
    g = _Graph(base.graph)
    scaled = _fold_batchnorm(g)
    folded = g.copy()  # calibrated as it computes: ReLUs and the model's activation quantizers in place
    steps = _take_activation_quantizers(g)
    clamped = _drop_relus(g, steps)
    points = _points(g)
    calibrate = [x for x in points if x not in steps]
    found = ranges(_proto(folded, base, calibrate), calibrate, calibration, clamped, method) if calibrate else {}
    qparams = {x: (steps[x], 0) if x in steps else found[x] for x in points}
    out = Int8Model(onnx.ModelProto(), from_model=[x for x in points if x in steps], calibrated=calibrate)
    new_nodes: list[onnx.NodeProto] = []
    for x in points:  # QuantizeLinear + DequantizeLinear after each, its readers reading the latter
        scale, zero = qparams[x]
        g.consts[f"{x}.scale"], g.consts[f"{x}.zero"] = np.array(scale, np.float32), np.array(zero, np.uint8)
        g.rename(x, f"{x}.dq")
        new_nodes += [helper.make_node("QuantizeLinear", [x, f"{x}.scale", f"{x}.zero"], [f"{x}.q"], name=f"{x}.q"),
                      helper.make_node("DequantizeLinear", [f"{x}.q", f"{x}.scale", f"{x}.zero"], [f"{x}.dq"],
                                       name=f"{x}.dq")]
    for conv in [n for n in g.nodes if n.op_type == "Conv"]:
        new_nodes += _int8_weights(g, conv, quant, ckpt, quantized, scaled.get(conv.input[1]), qparams, out)
    g.nodes = _topological([*new_nodes, *g.nodes], g.inputs, set(g.consts))
    out.proto = _proto(g, base)
    onnx.checker.check_model(out.proto, full_check=True)
    return out


def _int8_weights(g: _Graph, conv: onnx.NodeProto, quant: QuantSpec | None, ckpt: Checkpoint, quantized: set[str],
                  k: np.ndarray | None, qparams: dict[str, tuple[float, int]], out: Int8Model) -> list[onnx.NodeProto]:
    """Replace ``conv``'s float weight and bias by int8 / int32 codes + ``DequantizeLinear``
    (the checkpoint's own codes for the weights in ``quantized``)."""
    key = conv.input[1]
    w = g.consts[key]
    if quant is not None and key in quantized:
        spec = quant.for_tensor(key)
        codes = grid_codes(key, ckpt.state_dict[key].float(), spec)
        channels = w.shape[0]
        scales = np.broadcast_to(codes.scales.astype(np.float64), (channels,)).copy()
        levels = codes.levels.reshape(w.shape)
        kk = np.ones(channels) if k is None else k
        scale = (scales * np.abs(kk)).astype(np.float32)
        q = (levels * np.sign(kk).reshape(-1, *[1] * (w.ndim - 1))).astype(np.int8)
        out.exact.append(key)
    else:
        top = np.abs(w.reshape(len(w), -1)).max(1)
        scale = np.where(top > 0, top / 127, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        out.requantized.append(key)
    g.consts[f"{key}.int8"], g.consts[f"{key}.wscale"] = q, scale
    g.consts[f"{key}.wzero"] = np.zeros(len(scale), np.int8)
    nodes = [helper.make_node("DequantizeLinear", [f"{key}.int8", f"{key}.wscale", f"{key}.wzero"], [f"{key}.w"],
                              name=f"{key}.w", axis=0)]
    conv.input[1] = f"{key}.w"
    if len(conv.input) > 2 and conv.input[2]:
        bias, x_scale = g.consts[conv.input[2]], qparams[conv.input[0].removesuffix(".dq")][0]
        bscale = (np.float64(x_scale) * scale.astype(np.float64)).astype(np.float32)
        g.consts[f"{key}.bias32"] = np.round(bias / bscale).astype(np.int32)
        g.consts[f"{key}.bscale"], g.consts[f"{key}.bzero"] = bscale, np.zeros(len(bscale), np.int32)
        nodes.append(helper.make_node("DequantizeLinear", [f"{key}.bias32", f"{key}.bscale", f"{key}.bzero"],
                                      [f"{key}.b"], name=f"{key}.b", axis=0))
        conv.input[2] = f"{key}.b"
    return nodes


def _topological(nodes: list[onnx.NodeProto], inputs: list[str], consts: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` ordered so that each comes after the producers of its inputs."""
    ready, order, pending = set(inputs) | consts | {""}, [], list(nodes)
    while pending:
        progress = [n for n in pending if all(x in ready for x in n.input)]
        if not progress:
            raise RuntimeError(f"export bug: int8 graph has a cycle or a missing input at {pending[0].name}")
        for n in progress:
            order.append(n)
            ready.update(n.output)
        pending = [n for n in pending if n not in progress]
    return order


def fused_ops(source: onnx.ModelProto | str | Path) -> Counter:
    """The operators of the graph a default onnxruntime CPU session runs (after its fusions):
    ``QLinearConv``, ``QLinearAdd`` ... where the integer kernels took over."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # not its warning that the saved graph is tuned to this machine
        model = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
