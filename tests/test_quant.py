"""Fake quantization: the formulas, level counts, zeros, STE gradient, callback install/bake;
per-channel ranges and learned (LSQ) ranges."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.layers import bake, baked_grid, quantizable_layers, weight_parametrization, with_parametrization
from compress.lsq import LearnedFakeQuant
from compress.quant import (
    CLIP_GRID, FakeQuant, QuantizationCallback, baked_grids, check_mode, check_nbits, code_range, mse_clip, quantize,
    quantize_codes,
)
from compress.stats import distinct_values

NBITS = range(2, 9)
MODES = ("sym", "asym")


def spec_quantize(w: torch.Tensor, mode: str, nbits: int) -> torch.Tensor:
    """The quantizers written straight from the spec, independently of compress.quant."""
    if mode == "asym":
        lo, hi = w.min(), w.max()
        scale = (hi - lo) / (2**nbits - 1)
        q = torch.round((w - lo) / scale) * scale + lo
    else:
        scale = w.abs().max() / (2 ** (nbits - 1) - 1)
        q = torch.round(w / scale) * scale
    return torch.where(w == 0, torch.zeros_like(w), q)


def rand(*shape: int, seed: int = 0, zeros: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.1
    if zeros:
        w[torch.rand(*shape, generator=g) < zeros] = 0.0
    return w


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_spec_reimplementation(mode: str, nbits: int) -> None:
    for seed, zeros in ((0, 0.0), (1, 0.3), (2, 0.8)):
        w = rand(16, 8, 3, 3, seed=seed, zeros=zeros)
        assert torch.equal(quantize(w, mode, nbits), spec_quantize(w, mode, nbits))


@pytest.mark.parametrize("nbits", NBITS)
def test_asym_levels(nbits: int) -> None:
    w = rand(64, 32, seed=nbits)
    q = quantize(w, "asym", nbits)
    assert torch.unique(q).numel() <= 2**nbits
    # at small widths every level is used by 2k random values
    if nbits <= 4:
        assert torch.unique(q).numel() == 2**nbits
    # the range end points are levels: min maps to itself, max to itself (up to rounding)
    assert q.min() == w.min()
    torch.testing.assert_close(q.max(), w.max())
    # levels are min + k*scale with k integer in 0..2^n-1
    scale = (w.max() - w.min()) / (2**nbits - 1)
    k = (q - w.min()) / scale
    torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)
    assert k.round().min() == 0 and k.round().max() == 2**nbits - 1
    # rounding to the nearest level: error at most half a step
    assert ((q - w).abs() <= scale / 2 * (1 + 1e-4)).all()


@pytest.mark.parametrize("nbits", NBITS)
def test_sym_levels(nbits: int) -> None:
    w = rand(64, 32, seed=10 + nbits)
    q = quantize(w, "sym", nbits)
    qmax = 2 ** (nbits - 1) - 1
    assert torch.unique(q).numel() <= 2**nbits - 1
    scale = w.abs().max() / qmax
    k = q / scale
    torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)
    k = k.round()
    assert k.abs().max() == qmax
    # symmetric: the set of levels is closed under negation (for the codes used)
    levels = set(k.unique().tolist())
    if nbits <= 4:
        assert levels == set(range(-qmax, qmax + 1))
    torch.testing.assert_close(q.abs().max(), w.abs().max())
    assert ((q - w).abs() <= scale / 2 * (1 + 1e-4)).all()


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("mode", MODES)
def test_codes_range(mode: str, nbits: int) -> None:
    w = rand(32, 32, seed=3)
    codes, scale, offset = quantize_codes(w, mode, nbits)
    assert torch.equal(codes, codes.round())
    if mode == "asym":
        assert codes.min() == 0 and codes.max() == 2**nbits - 1
    else:
        assert codes.abs().max() == 2 ** (nbits - 1) - 1
        assert offset == 0
    torch.testing.assert_close(codes * scale + offset, quantize(w, mode, nbits))


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("mode", MODES)
def test_exact_zeros_stay_zero(mode: str, nbits: int) -> None:
    w = rand(32, 16, 3, 3, seed=4, zeros=0.5)
    # also zeros in a tensor with a strictly positive range elsewhere (asym levels do not hit 0)
    w2 = rand(200, seed=5).abs() + 0.05
    w2[::3] = 0.0
    for t in (w, w2):
        q = quantize(t, mode, nbits)
        assert (q[t == 0] == 0).all()
        assert torch.unique(q[t != 0]).numel() <= 2**nbits


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("mode", MODES)
def test_idempotent(mode: str, nbits: int) -> None:
    for zeros in (0.0, 0.5):
        w = rand(32, 16, 3, 3, seed=6, zeros=zeros)
        once = quantize(w, mode, nbits)
        twice = quantize(once, mode, nbits)
        torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("zp_frac", (0.25, 0.6))
def test_asym_matches_torch_fake_quantize(nbits: int, zp_frac: float) -> None:
    """With min = -zp*scale (integral zero point), asym is torch's affine fake quantization."""
    qmax = 2**nbits - 1
    zp = min(max(1, round(zp_frac * qmax)), qmax - 1)
    scale = 2.0**-6  # a power of two: min, max and scale are exact in float32
    g = torch.Generator().manual_seed(nbits)
    codes = torch.randint(0, qmax + 1, (500,), generator=g)
    codes[0], codes[1] = 0, qmax  # the range end points are exact
    noise = (torch.rand(500, generator=g) - 0.5) * 0.6  # |noise| < 0.3: no .5 ties
    noise = torch.where(codes == 0, noise.abs(), torch.where(codes == qmax, -noise.abs(), noise))  # stay in range
    noise[:2] = 0.0
    w = (codes.float() + noise - zp) * scale
    assert w.min() == -zp * scale and w.max() == (qmax - zp) * scale
    ours = quantize(w, "asym", nbits)
    ref = torch.fake_quantize_per_tensor_affine(w, scale, zp, 0, qmax)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
    # and a non power-of-two scale agrees up to float rounding
    w3 = w * 1.37
    ours3 = quantize(w3, "asym", nbits)
    ref3 = torch.fake_quantize_per_tensor_affine(w3, scale * 1.37, zp, 0, qmax)
    torch.testing.assert_close(ours3, ref3, rtol=0, atol=1e-6)


def test_constant_tensor_is_finite() -> None:
    for mode in MODES:
        for t in (torch.full((10,), 0.3), torch.zeros(10)):
            q = quantize(t, mode, 4)
            assert torch.isfinite(q).all()
            torch.testing.assert_close(q, t)


@pytest.mark.parametrize("mode", MODES)
def test_straight_through_gradient(mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, bias=False)
    parametrize.register_parametrization(conv, "weight", FakeQuant(mode, 3))
    g = torch.randn_like(conv.weight)
    (conv.weight * g).sum().backward()
    original = conv.parametrizations.weight.original
    assert torch.equal(original.grad, g)
    # the forward value is the quantized latent weight
    assert torch.equal(conv.weight.detach(), quantize(original.detach(), mode, 3))
    assert torch.unique(conv.weight.detach()).numel() <= 8


def test_gradient_flows_through_layer_output() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(6, 5, bias=False)
    parametrize.register_parametrization(lin, "weight", FakeQuant("asym", 2))
    x = torch.randn(7, 6)
    lin(x).sum().backward()
    # d(sum(x @ W^T))/dW = column sums of x, broadcast over the output rows: identity STE
    expected = x.sum(0).expand(5, 6)
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, expected)


@pytest.mark.parametrize("bad", [1, 9, 0, -3, 2.5, 4.0, "4", True, False, None])
def test_check_nbits_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"nbits") as err:
        check_nbits(bad)
    assert "2..8" in str(err.value)


@pytest.mark.parametrize("nbits", NBITS)
def test_check_nbits_accepts(nbits: int) -> None:
    assert check_nbits(nbits) == nbits
    assert QuantizationCallback("asym", nbits).nbits == nbits


def test_callback_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nbits"):
        QuantizationCallback("asym", 9)
    with pytest.raises(ValueError, match="sym, asym"):
        QuantizationCallback("int8", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        check_mode("none")


@pytest.mark.parametrize("mode", MODES)
def test_install_quantizes_exactly_quantizable_layers(resnet: nn.Module, block_names: set[str], mode: str) -> None:
    cb = QuantizationCallback(mode, 4)
    cb.install(resnet)
    quantized = with_parametrization(resnet, FakeQuant)
    assert set(quantized) == block_names and len(quantized) == 18
    assert set(quantizable_layers(resnet)) == block_names
    assert not parametrize.is_parametrized(resnet.conv1)
    assert not parametrize.is_parametrized(resnet.linear)
    # installing twice is a no-op (no stacked quantizers)
    cb.install(resnet)
    assert all(len(resnet.get_submodule(n).parametrizations.weight) == 1 for n in block_names)
    # the model still runs, on small images too
    assert resnet(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_install_without_residual_blocks_raises() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match="nothing to quantize"):
        QuantizationCallback("sym", 4).install(model)
    assert not parametrize.is_parametrized(model[0])


@pytest.mark.parametrize("nbits", (2, 3, 4, 8))
@pytest.mark.parametrize("mode", MODES)
def test_remove_bakes_plain_quantized_weights(resnet: nn.Module, block_names: set[str], mode: str, nbits: int) -> None:
    before = {n: m.weight.detach().clone() for n, m in resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    QuantizationCallback(mode, nbits).install(resnet)
    QuantizationCallback.remove(resnet)
    limit = 2**nbits if mode == "asym" else 2**nbits - 2  # nonzero levels
    for name, w0 in before.items():
        m = resnet.get_submodule(name)
        assert not parametrize.is_parametrized(m)
        assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
        w = m.weight.detach()
        if name in block_names:
            assert torch.unique(w[w != 0]).numel() <= limit
            assert torch.equal(w, spec_quantize(w0, mode, nbits))
        else:
            assert torch.equal(w, w0)  # stem conv and classifier stay full precision
    counts = distinct_values(resnet)
    assert set(counts) == block_names and max(counts.values()) <= limit
    assert "weight" in dict(resnet.layer1[0].conv1.named_parameters())


@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_mse_clip_lowers_the_error_and_keeps_the_grid(mode: str, nbits: int) -> None:
    torch.manual_seed(nbits)
    w = torch.randn(64, 32, 3, 3) * 0.05
    w[w.abs() < 0.01] = 0  # pruned weights stay exactly zero
    clip = mse_clip(w, mode, nbits)
    assert clip in CLIP_GRID and clip < 1.0  # a Gaussian's tails are not worth their levels
    q, q_full = quantize(w, mode, nbits, clip), quantize(w, mode, nbits)
    err = lambda x: float(((x - w)[w != 0] ** 2).sum())  # noqa: E731
    assert err(q) < err(q_full)
    assert torch.all(q[w == 0] == 0)
    assert torch.unique(q[w != 0]).numel() <= 2**nbits
    codes, scale, offset = quantize_codes(w, mode, nbits, clip)
    lo, hi = code_range(mode, nbits)
    assert codes.min() == lo and codes.max() == hi  # the clipped extremes sit on the end levels
    torch.testing.assert_close(torch.where(w == 0, 0.0, codes * scale + offset), q)


def test_minmax_is_the_seeds_range_and_clip_validates() -> None:
    torch.manual_seed(0)
    w = torch.randn(1000)
    assert torch.equal(quantize(w, "asym", 3, 1.0), quantize(w, "asym", 3))
    assert QuantizationCallback("asym", 3).clip == "minmax"
    with pytest.raises(ValueError, match="quant.clip='max' is not allowed: use one of minmax, mse"):
        QuantizationCallback("asym", 3, "max")


def test_mse_callback_installs_a_clip_per_tensor(resnet: torch.nn.Module) -> None:
    QuantizationCallback("asym", 2, "mse").install(resnet)
    clips = {n: weight_parametrization(m, FakeQuant).clip for n, m in quantizable_layers(resnet).items()}
    assert len(clips) == 18 and all(c < 1.0 for c in clips.values()), clips


# --------------------------------------------------------------- per-channel ranges, LSQ


def channel_spread(seed: int = 0, zeros: float = 0.0) -> torch.Tensor:
    """A conv weight whose output channels differ in magnitude by up to 30x, as trained ones do."""
    w = rand(16, 8, 3, 3, seed=seed, zeros=zeros)
    return w * torch.logspace(-1.5, 0, 16).view(-1, 1, 1, 1)


def per_channel_distinct(w: torch.Tensor) -> int:
    return max(int(torch.unique(c[c != 0]).numel()) for c in w)


@pytest.mark.parametrize("nbits", (2, 3, 4, 8))
@pytest.mark.parametrize("mode", MODES)
def test_per_channel_is_per_tensor_on_each_channel(mode: str, nbits: int) -> None:
    w = channel_spread(seed=nbits, zeros=0.3)
    q = quantize(w, mode, nbits, channel=True)
    for c in range(len(w)):
        assert torch.equal(q[c], spec_quantize(w[c], mode, nbits))
    assert per_channel_distinct(q) <= 2**nbits
    assert (q[w == 0] == 0).all()
    codes, scale, offset = quantize_codes(w, mode, nbits, channel=True)
    assert scale.shape == offset.shape == (16, 1, 1, 1)
    lo, hi = code_range(mode, nbits)
    assert lo <= codes.min() and codes.max() <= hi


@pytest.mark.parametrize("clip", ("minmax", "mse"))
@pytest.mark.parametrize("mode", MODES)
def test_per_channel_lowers_the_error(mode: str, clip: str) -> None:
    w = channel_spread(seed=1, zeros=0.5)
    err = lambda x: float(((x - w)[w != 0] ** 2).sum())  # noqa: E731
    factors = {ch: mse_clip(w, mode, 2, ch) if clip == "mse" else 1.0 for ch in (False, True)}
    per_tensor, per_channel = (quantize(w, mode, 2, factors[ch], ch) for ch in (False, True))
    assert err(per_channel) < 0.8 * err(per_tensor)
    assert per_channel_distinct(per_channel) <= 4 and torch.unique(per_tensor[w != 0]).numel() <= 4


@pytest.mark.parametrize("mode", MODES)
def test_per_channel_mse_clip_picks_a_factor_per_channel(mode: str) -> None:
    w = channel_spread(seed=2, zeros=0.2)
    clip = mse_clip(w, mode, 3, channel=True)
    assert isinstance(clip, torch.Tensor) and clip.shape == (16, 1, 1, 1)
    assert set(clip.flatten().tolist()) <= set(CLIP_GRID)
    for c in (0, 7, 15):  # each channel's factor is the per-tensor search on that channel alone
        assert float(clip[c]) == mse_clip(w[c], mode, 3)


def test_per_channel_on_real_weights(pretrained) -> None:
    from compress.checkpoint import load_checkpoint

    w = load_checkpoint(str(pretrained)).state_dict["layer2.0.conv1.weight"]
    err = lambda x: float(((x - w) ** 2).sum())  # noqa: E731
    for mode in MODES:
        assert err(quantize(w, mode, 3, channel=True)) < err(quantize(w, mode, 3))


def learned(w: torch.Tensor, mode: str, nbits: int, channel: bool) -> nn.Conv2d:
    conv = nn.Conv2d(w.shape[1], w.shape[0], 3, bias=False)
    conv.weight.data.copy_(w)
    cb = QuantizationCallback(mode, nbits, granularity="channel" if channel else "tensor", learn_range=True)
    parametrize.register_parametrization(conv, "weight", cb.quantizer(conv.weight.detach()))
    return conv


@pytest.mark.parametrize("channel", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_learned_range_starts_at_the_fixed_one_and_gets_lsq_gradients(mode: str, channel: bool) -> None:
    w = channel_spread(seed=3, zeros=0.4)
    conv = learned(w, mode, 3, channel)
    lsq = weight_parametrization(conv, LearnedFakeQuant)
    assert lsq is not None and torch.equal(conv.weight.detach(), quantize(w, mode, 3, channel=channel))
    assert lsq.scale.shape == ((16, 1, 1, 1) if channel else ())
    assert isinstance(lsq.offset, nn.Parameter) == (mode == "asym")
    g = torch.randn_like(w)
    (conv.weight * g).sum().backward()
    # LSQ: d w_q / d scale = code - (w - offset) / scale inside the range, code at or beyond its
    # ends (where torch.clamp passes no gradient); times 1/sqrt(N * Q_p)
    n = w.numel() // lsq.scale.numel()
    x = (w - lsq.offset.detach()) / lsq.scale.detach()
    lo, hi = code_range(mode, 3)
    dq = torch.where(w == 0, 0.0, x.clamp(lo, hi).round() - torch.where((x > lo) & (x < hi), x, 0.0))
    expected = (g * dq).sum(dim=(1, 2, 3), keepdim=True) if channel else (g * dq).sum()
    torch.testing.assert_close(lsq.scale.grad, expected / (n * hi) ** 0.5)
    original = conv.parametrizations.weight.original
    assert (original.grad[w == 0] == 0).all()  # pruned weights: no gradient, and they stay zero


@pytest.mark.parametrize("channel", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_learned_range_trains_and_bakes_onto_its_recorded_grid(mode: str, channel: bool) -> None:
    torch.manual_seed(0)
    w = channel_spread(seed=4, zeros=0.5)
    conv = learned(w, mode, 2, channel)
    lsq = weight_parametrization(conv, LearnedFakeQuant)
    start = [p.detach().clone() for p in lsq.parameters()]
    assert len(start) == (2 if mode == "asym" else 1)
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)
    x, target = torch.randn(8, 8, 6, 6), torch.randn(8, 16, 4, 4)
    for _ in range(5):
        opt.zero_grad()
        ((conv(x) - target) ** 2).mean().backward()
        opt.step()
    assert all(not torch.equal(p, s) for p, s in zip(lsq.parameters(), start))  # scale (and offset) moved
    bake(conv)
    baked = conv.weight.detach()
    assert (baked[w == 0] == 0).all()
    assert per_channel_distinct(baked) <= 4 and (channel or torch.unique(baked[baked != 0]).numel() <= 4)
    scale, offset = baked_grid(conv)
    assert torch.equal(scale, lsq.scale.detach()) and torch.equal(offset, lsq.offset.detach())
    codes = torch.round((baked - offset) / scale).clamp(*code_range(mode, 2))
    assert torch.equal(torch.where(baked == 0, 0.0, codes * scale + offset), baked)  # bit for bit


def test_fixed_quantizers_record_their_grid_at_bake(resnet: nn.Module) -> None:
    QuantizationCallback("asym", 3, "mse", "channel").install(resnet)
    latent = {n: m.weight.detach().clone() for n, m in quantizable_layers(resnet).items()}
    bake(resnet)
    grids = baked_grids(resnet)
    assert set(grids) == {f"{n}.weight" for n in latent}
    for n, w in latent.items():
        scale, offset = (torch.tensor(grids[f"{n}.weight"][k]).view(-1, 1, 1, 1) for k in ("scale", "offset"))
        assert len(scale) == w.shape[0]
        codes = torch.round((w - offset) / scale).clamp(0, 7)
        assert torch.equal(resnet.get_submodule(n).weight.detach(), torch.where(w == 0, 0.0, codes * scale + offset))


def test_granularity_and_learn_range_validate() -> None:
    with pytest.raises(ValueError, match="quant.granularity='row' is not allowed: use one of tensor, channel"):
        QuantizationCallback("asym", 3, granularity="row")
    with pytest.raises(ValueError, match="quant.learn_range='yes' is not allowed: use true or false"):
        QuantizationCallback("asym", 3, learn_range="yes")  # type: ignore[arg-type]
