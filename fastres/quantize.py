"""int8 and fp8 post-training quantization for the Triton path: activation ranges from histograms,
weight scales. A `QuantFormat` says which: INT8 (values in [-127, 127]) or FP8 (e4m3, [-448, 448]); the
scales, histograms and methods are the same, only the grid a scale maps onto differs.

Symmetric int8 everywhere (values in [-127, 127], zero point 0), so the integer GEMM needs no
zero-point correction terms:
* weights: one scale per output channel, max |w| / 127 (per-tensor weights lose ResNet-101, see
  pytorch/vision#2648);
* activations: one scale per tensor (per plan value), threshold / 127, the threshold chosen on a
  histogram of |x| over the calibration images by one of `METHODS`:
  - "percentile" (default, 99.99): the |x| below which that share of the values lies;
  - "entropy": TensorRT's calibration: the threshold whose 128-level quantized distribution has the
    least KL divergence from the clipped reference distribution;
  - "mse": the threshold with the least expected squared quantization error (rounding + clipping);
  - "max": the largest |x| seen (no clipping; an outlier then spends the whole range).

The histogram has `BINS` bins over [0, range); a batch with a larger |x| doubles the range until it
fits, merging bin pairs, which is exact (no re-binning error), so one pass over the images suffices.
ResNet activations after a ReLU are non-negative, so symmetric int8 leaves the negative half unused
(7 bits of magnitude); that is the price of zero-point-free GEMMs, which TensorRT pays as well.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .graph import ConvOp, MaxPoolOp, avg_pool_2x2

INT8_MAX = 127
FP8_MAX = 448.0  # e4m3's largest finite value (float8_e4m3fn has no infinity)
BINS = 2048
QUANT_LEVELS = 128  # magnitude levels of symmetric int8 (0..127): the entropy method's target bins
METHODS = ("percentile", "entropy", "mse", "max")
DEFAULT_METHOD = "percentile"
DEFAULT_PERCENTILE = 99.99


class QuantFormat:
    """A symmetric 8-bit format: its torch dtype and largest magnitude, and its grid (`round`)."""

    def __init__(self, name: str, dtype: torch.dtype, max_value: float):
        self.name, self.dtype, self.max = name, dtype, float(max_value)

    def __repr__(self) -> str:
        return f"QuantFormat({self.name})"

    def round(self, v: Tensor) -> Tensor:
        """v (in units of the scale) saturated to [-max, max] and rounded to the format's nearest value,
        ties to even, in v's float dtype: what the kernels' epilogues store, as a float."""
        v = v.clamp(-self.max, self.max)
        if self.dtype == torch.int8:
            return torch.round(v)
        return v.to(self.dtype).to(v.dtype)  # torch's e4m3 cast rounds to nearest even; NaN stays NaN

    def cast(self, v: Tensor) -> Tensor:
        """`round` stored in the format's dtype."""
        return self.round(v.double()).to(self.dtype)


INT8 = QuantFormat("int8", torch.int8, INT8_MAX)
FP8 = QuantFormat("fp8", torch.float8_e4m3fn, FP8_MAX)
FORMATS = {torch.int8: INT8, torch.float8_e4m3fn: FP8}
QUANTIZED_DTYPES = tuple(FORMATS)  # the calibrated engine dtypes


def quant_format(dtype: torch.dtype) -> QuantFormat:
    if dtype not in FORMATS:
        raise ConfigError(f"no quantized format for {dtype}: use torch.int8 or torch.float8_e4m3fn")
    return FORMATS[dtype]


class Histogram:
    """Counts of |x| in BINS equal bins over [0, self.range), the exact max |x| seen, and how many of
    the values are exactly 0 (counted in bin 0 as well; the entropy method sets them apart)."""

    def __init__(self, bins: int = BINS):
        self.counts = np.zeros(bins, dtype=np.float64)
        self.range = 0.0
        self.amax = 0.0
        self.zeros = 0.0

    def add(self, x: Tensor) -> None:
        values = x.detach().abs().flatten().double().cpu()
        if values.numel() == 0:
            return
        amax = float(values.max())
        if not math.isfinite(amax):
            raise ConfigError("calibration met a non-finite activation: check the calibration images")
        self.amax = max(self.amax, amax)
        self.zeros += float((values == 0).sum())
        if self.range == 0.0:
            self.range = amax if amax > 0 else 1.0
        while amax > self.range:  # double the range: bin pairs merge exactly, upper half empty
            half = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([half, np.zeros_like(half)])
            self.range *= 2
        counts = torch.histc(values, bins=self.counts.size, min=0.0, max=self.range)
        self.counts += counts.numpy()

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.range, self.counts.size + 1)


def threshold(
    hist: Histogram, method: str = DEFAULT_METHOD, percentile: float = DEFAULT_PERCENTILE, fmt=INT8
) -> float:
    """The clipping threshold (the value the format's largest code stands for) the method picks from the
    histogram. Only "mse" depends on the format (its error is measured on the format's grid); "entropy"
    keeps TensorRT's 128 levels for both."""
    if hist.counts.sum() == 0 or hist.amax == 0.0:
        return 1.0  # an all-zero tensor: any scale represents it exactly
    if method == "max":
        return hist.amax
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        cdf = np.cumsum(hist.counts) / hist.counts.sum()
        index = int(np.searchsorted(cdf, percentile / 100 * (1 - 1e-12)))  # first bin reaching it
        return min(float(hist.edges[index + 1]), hist.amax)
    if method == "mse":
        return _mse_threshold(hist, fmt)
    if method == "entropy":
        return _entropy_threshold(hist)
    raise ConfigError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")


def _mse_threshold(hist: Histogram, fmt=INT8) -> float:
    """Candidates: every bin's upper edge. Each bin's values are taken at its centre; a value below the
    threshold rounds to the nearest value of the format's grid, one above clips to the threshold."""
    edges = hist.edges
    centres = (edges[:-1] + edges[1:]) / 2
    candidates = edges[1:]
    errors = np.empty(candidates.size)
    for start in range(0, candidates.size, 256):  # blocks of candidates bound the temporary's size
        t = candidates[start : start + 256, None]
        step = t / fmt.max
        dequantized = fmt.round(torch.from_numpy(centres[None, :] / step)).numpy() * step
        errors[start : start + 256] = ((centres[None, :] - dequantized) ** 2 * hist.counts[None, :]).sum(1)
    return min(float(candidates[int(np.argmin(errors))]), hist.amax)


def _entropy_threshold(hist: Histogram) -> float:
    """TensorRT's entropy calibration: for each candidate i bins (i >= 128), the reference P is the
    first i bins with everything above folded into the last; Q merges those i bins into 128 levels and
    spreads each level's count evenly back over its non-empty bins; keep the i of least KL(P || Q)
    (both smoothed, see `_smoothed`).

    Exact zeros are left out. A ReLU's output is about half zeros, all in bin 0; Q spreads that spike
    over every bin of the first level, so the KL is least where a level is a single bin (i < 256) and
    the method clipped post-ReLU tensors to an eighth of their range (30% top-1 on the digits model).
    int8 represents 0 exactly at any scale, so the zeros say nothing about the threshold (NVIDIA's
    pytorch-quantization sets bin 0 to bin 1's count for the same reason)."""
    counts = hist.counts.copy()
    counts[0] -= hist.zeros
    last = int(np.nonzero(counts)[0][-1]) + 1
    best, best_bins = math.inf, max(last, QUANT_LEVELS)
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i] = sum(counts[i:])
    for i in range(QUANT_LEVELS, min(last, counts.size) + 1):
        p = counts[:i].copy()
        if i < counts.size:
            p[i - 1] += tail[i]
        merged = i // QUANT_LEVELS
        starts = np.arange(QUANT_LEVELS) * merged  # the last level also takes the remainder bins
        lengths = np.diff(np.append(starts, i))
        nonzero = counts[:i] > 0
        level_counts = np.add.reduceat(counts[:i], starts)
        level_bins = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(level_counts, level_bins, out=np.zeros(QUANT_LEVELS), where=level_bins > 0)
        q = np.repeat(per_bin, lengths) * nonzero
        p_norm, q_norm = _smoothed(p / p.sum()), _smoothed(q / q.sum())
        divergence = float(np.sum(p_norm * np.log(p_norm / q_norm)))
        if divergence < best:
            best, best_bins = divergence, i
    return min(float(hist.edges[best_bins]), hist.amax)


def _smoothed(distribution: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Every bin positive: empty bins get eps, taken evenly from the others (as MXNet's port of the
    TensorRT method does). Without it, the clipped mass folded into an empty last bin makes every
    threshold below an isolated outlier infinitely divergent, so the outlier would always win."""
    empty = distribution == 0
    n_empty = int(empty.sum())
    if n_empty == 0:
        return distribution
    taken = eps * n_empty / (distribution.size - n_empty)
    return np.where(empty, eps, distribution - taken).clip(min=eps * 1e-3)


def scale_for(threshold_value: float, fmt=INT8) -> float:
    return threshold_value / fmt.max


def weight_scales(weight: Tensor, fmt=INT8) -> Tensor:
    """Per-output-channel symmetric scales (float64, C_out) of a (C_out, ...) weight: max |w| / the
    format's max. An all-zero channel gets scale 1 (its weights are 0 either way)."""
    amax = weight.detach().double().abs().reshape(weight.shape[0], -1).amax(dim=1)
    return torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))


def quantize_weight(weight: Tensor, scales: Tensor, fmt=INT8) -> Tensor:
    """Weights in the format: w / scale (per output channel) saturated and rounded to nearest even."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return fmt.cast(weight.double() / scales.view(shape))


def quantize_conv_weights(
    op: ConvOp, scales: dict[str, float], fmt=INT8
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(8-bit weight, 8-bit projection-shortcut weight or None, per-channel dequantization factor f) of
    a conv whose inputs have the given scales: conv(q_x, q_w) [+ conv(q_x2, q_wd)] times f is the real
    pre-bias output. Main and projection share one int32 accumulator, so both are quantized against
    f = max(s_w * s_x, s_wd * s_x2): the larger term keeps its full int8 range, the other is a little
    coarser. Without a projection f = s_w * s_x (plain per-channel weights)."""
    s_x = scales[op.inputs[0]]
    factor = weight_scales(op.weight, fmt) * s_x
    shortcut = None
    if op.shortcut_input is not None:
        s_x2 = scales[op.shortcut_input]
        factor = torch.maximum(factor, weight_scales(op.shortcut_weight, fmt) * s_x2)
        shortcut = quantize_weight(op.shortcut_weight, factor / s_x2, fmt)
    return quantize_weight(op.weight, factor / s_x, fmt), shortcut, factor


def fake_quantized_plan(plan, scales: dict[str, float], fmt=INT8):
    """The plan with every conv outside the float stem holding its 8-bit weights dequantized (float64),
    so that a float run of it computes what the quantized path computes, up to the activations'
    rounding."""
    import dataclasses

    stem = {op.name for op in float_stem(plan)}
    ops = []
    for op in plan.ops:
        if isinstance(op, ConvOp) and op.name not in stem:
            q_w, q_wd, factor = quantize_conv_weights(op, scales, fmt)
            view = lambda f: f.view(-1, 1, 1, 1)
            changes = dict(weight=q_w.double() * view(factor / scales[op.inputs[0]]))
            if q_wd is not None:
                changes["shortcut_weight"] = q_wd.double() * view(factor / scales[op.shortcut_input])
            op = dataclasses.replace(op, **changes)
        ops.append(op)
    return dataclasses.replace(plan, ops=ops)


def pooled_codes(x: Tensor, scale: float, fmt=INT8) -> Tensor:
    """ResNet-D's 2x2 mean of an 8-bit value x (codes * scale) as the quantized kernel's A load takes
    it: the mean of the codes themselves (exact), rounded to the grid, ties to even. Averaging x in
    float instead would put a mean that is a tie a rounding error to either side of it."""
    codes = fmt.round(x.double() / scale)
    return (fmt.round(avg_pool_2x2(codes)) * scale).to(x.dtype)


def simulate_int8(plan, scales: dict[str, float], images: Tensor, observer=None, fmt=INT8) -> Tensor:
    """float32 logits of the quantized path's arithmetic simulated on the torch backend ("fake quant"):
    8-bit weights dequantized, and each quantized value rounded to its scale's grid (the format's) as
    soon as its op produced it, before any later op reads it (and a pooled projection's 2x2 mean once
    more, as the kernel's A load rounds it). The Triton engine differs from this only
    by fp32 rounding in its epilogues (a code at most one step apart where a value meets a tie)."""
    from .backends.torch_backend import TorchBackend

    fake = fake_quantized_plan(plan, scales, fmt)
    backend = TorchBackend(fake, "cpu", torch.float32)
    backend.avg_pool = lambda value, x: pooled_codes(x, scales[value], fmt)
    producer = {op.name: op.output for op in fake.ops}

    def quantize_in_place(name: str, out: Tensor) -> None:
        # The torch backend hands the observer the very tensor the next ops read: rounding it here
        # is rounding the activation itself.
        scale = scales.get(producer[name])
        if scale is not None:
            out.copy_(fmt.round(out / scale) * scale)
        if observer is not None:
            observer(name, out)

    return backend.run(images.float(), None, observer=quantize_in_place)


def float_stem(plan) -> list[ConvOp]:
    """The convs the 8-bit Triton path runs in floating point: the stem and, for a deep stem (ResNet-D's
    three 3x3 convs), the ones after it up to the max-pool, which quantizes in its store. The stem conv
    reads the caller's float or uint8 images; quantizing the deep stem's other two convs would need a
    quantizing store in the stem kernel, for ~8% of ResNet-50-D's FLOPs."""
    convs = []
    for op in plan.ops:
        if not isinstance(op, ConvOp):
            if not isinstance(op, MaxPoolOp):
                raise ConfigError(f"8-bit needs a max-pool after the stem convs; {op.name!r} is a {op.kind}")
            return convs
        if op.residual is not None or op.shortcut_input is not None:
            raise ConfigError(f"8-bit: {op.name!r} has a residual before the stem's max-pool")
        convs.append(op)
    raise ConfigError("8-bit needs a max-pool after the stem convs; this plan has none")


def quantized_values(plan) -> list[str]:
    """The plan values that are int8 on the Triton path: every value a conv outside the float stem
    reads (main input, residual, projection-shortcut input). The head reads the last conv's output,
    which that conv writes in floating point (see backends/triton_int8.py)."""
    stem = {op.name for op in float_stem(plan)}
    values: list[str] = []
    for op in plan.ops:
        if isinstance(op, ConvOp) and op.name not in stem:
            values += [v for v in op.inputs if v not in values]
    return values


def collect_histograms(plan, images: Tensor, *, batch: int = 16) -> dict[str, Histogram]:
    """Histograms of |x| of each quantized value, from the folded plan run in float32 on the torch
    backend over the calibration images (normalised float32, N x 3 x H x W)."""
    from .backends.torch_backend import TorchBackend

    backend = TorchBackend(plan, "cpu", torch.float32)
    wanted = set(quantized_values(plan))
    producer = {op.name: op.output for op in plan.ops}
    histograms = {value: Histogram() for value in wanted}

    def observe(name: str, out: Tensor) -> None:
        value = producer.get(name)
        if value in wanted:
            histograms[value].add(out)

    for start in range(0, images.shape[0], batch):
        backend.run(images[start : start + batch].float(), None, observer=observe)
    return histograms


def activation_scales(
    plan, images: Tensor, method: str = DEFAULT_METHOD, percentile: float = DEFAULT_PERCENTILE, fmt=INT8
) -> dict[str, float]:
    """value -> per-tensor scale in the format, from the calibration images by `method`."""
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    histograms = collect_histograms(plan, images)
    return {v: scale_for(threshold(h, method, percentile, fmt), fmt) for v, h in histograms.items()}


def method_name(method: str, percentile: float = DEFAULT_PERCENTILE) -> str:
    """The method as the calibration record names it ("percentile-99.99", "entropy", ...)."""
    return f"percentile-{percentile:g}" if method == "percentile" else method


def parse_method(name: str) -> tuple[str, float]:
    """(method, percentile) from `method_name`'s spelling."""
    method, _, value = name.partition("-")
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {name!r}: use one of {', '.join(METHODS)}")
    return method, float(value) if value else DEFAULT_PERCENTILE
