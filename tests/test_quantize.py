"""int8 calibration methods on synthetic distributions with known answers, weight scales, histograms
of a plan's activations, and the calibration record's scales."""

import math

import numpy as np
import pytest
import torch
from e2e import calibrated

import fastres
from fastres.calibration import (
    CalibrationMismatchError,
    CalibrationRecord,
    check_record,
    read_record,
    weights_hash,
    write_record,
)
from fastres.errors import ConfigError
from fastres.quantize import (
    BINS,
    METHODS,
    Histogram,
    collect_histograms,
    method_name,
    parse_method,
    quantize_weight,
    quantized_values,
    threshold,
    weight_scales,
)
from fastres.testing import random_images

# Two-sided normal quantile: P(|x| <= z) = 0.9999 for z = Phi^-1(0.99995).
HALF_NORMAL_Q9999 = 3.890591886


def histogram_of(*batches) -> Histogram:
    hist = Histogram()
    for batch in batches:
        hist.add(batch)
    return hist


def test_uniform_max_is_percentile_100_and_the_largest_value():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    hist = histogram_of(x)
    amax = x.abs().max().item()
    assert threshold(hist, "max") == amax
    assert threshold(hist, "percentile", 100) == amax
    assert threshold(hist, "percentile", 99.99) == pytest.approx(1.5 * 0.9999, abs=2 * amax / BINS)
    # On a flat distribution nothing is an outlier: clipping only costs, so entropy and mse keep ~all.
    assert threshold(hist, "entropy") > 0.95 * amax
    assert threshold(hist, "mse") > 0.95 * amax


def test_gaussian_percentile_is_near_the_analytic_quantile():
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.7
    hist = histogram_of(*x.chunk(7))
    assert threshold(hist, "percentile", 99.99) == pytest.approx(0.7 * HALF_NORMAL_Q9999, rel=0.02)
    assert threshold(hist, "percentile", 50) == pytest.approx(0.7 * 0.6744898, rel=0.01)


def test_a_far_outlier_is_clipped_by_entropy_mse_and_percentile_but_not_by_max():
    # One value at 100 sigma among a million: keeping it costs a step of 0.79 for everything else
    # (squared rounding error ~5e4 in total), clipping it costs (100 - t)^2 < 1e4.
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(2))
    x[123] = 100.0
    hist = histogram_of(x)
    assert threshold(hist, "max") == 100.0
    for method in ("entropy", "mse", "percentile"):
        t = threshold(hist, method)
        assert 3.0 < t < 20.0, (method, t)  # below the outlier, above the bulk's core


def brute_force_kl_bins(counts) -> int:
    """The bin count i that TensorRT's entropy calibration picks (GTC 2017, "8-bit Inference with
    TensorRT"), written out bin by bin in float64 from the talk's pseudocode. Only for histograms
    without empty bins, where the smoothing of empty bins never applies."""
    counts = np.asarray(counts, dtype=np.float64)
    assert (counts > 0).all()
    divergences = {}
    for i in range(128, counts.size + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()  # the clipped values saturate into the last bin
        q = np.empty(i)
        width = i // 128
        for level in range(128):
            lo, hi = level * width, (i if level == 127 else (level + 1) * width)
            q[lo:hi] = counts[lo:hi].sum() / (hi - lo)  # every bin is non-empty here
        p, q = p / p.sum(), q / q.sum()
        divergences[i] = float(np.sum(p * np.log(p / q)))
    return min(divergences, key=divergences.get)


def laplace_histogram(zeros: float = 0.0) -> Histogram:
    """Expected counts (no sampling noise) of |x| for a unit Laplacian over [0, 16), every bin
    non-empty, with `zeros` exact zeros added as a ReLU adds them."""
    hist = Histogram()
    hist.range = hist.amax = 16.0
    cdf = 1 - np.exp(-hist.edges)
    hist.counts = 1e9 * np.diff(cdf)
    hist.counts[0] += zeros
    hist.zeros = zeros
    return hist


def test_entropy_picks_the_brute_force_kl_optimum_of_a_laplacian():
    hist = laplace_histogram()
    bins = brute_force_kl_bins(hist.counts)
    assert threshold(hist, "entropy") == pytest.approx(hist.edges[bins], rel=1e-12)
    # A clip of several scale parameters: the tail beyond it is worth less than the finer steps.
    assert 4.0 < hist.edges[bins] < 14.0, hist.edges[bins]


def test_entropy_ignores_a_relus_exact_zeros():
    # Half the values exactly 0, as after a ReLU: int8 holds 0 exactly at any scale, so the choice
    # must not move. (Counting them in bin 0 once clipped at 255 bins, under 2 of the 16 here.)
    assert threshold(laplace_histogram(zeros=1e9), "entropy") == threshold(laplace_histogram(), "entropy")
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(9))
    with_zeros, positives = histogram_of(x.relu()), histogram_of(x[x > 0])
    assert with_zeros.zeros == (x <= 0).sum().item() and positives.zeros == 0
    t = threshold(with_zeros, "entropy")
    assert t == threshold(positives, "entropy") and 2.5 < t <= with_zeros.amax


def test_mse_is_least_squared_error_among_thresholds():
    """The mse threshold's error on the samples is no worse than max's or a tight clip's."""
    x = torch.cat([torch.randn(50_000, generator=torch.Generator().manual_seed(3)), torch.tensor([40.0])])
    hist = histogram_of(x)

    def error(t):
        step = t / 127
        return ((x - (x / step).round().clamp(-127, 127) * step) ** 2).sum().item()

    best = threshold(hist, "mse")
    assert error(best) <= error(threshold(hist, "max"))
    assert error(best) <= error(1.0)


def test_histogram_range_doubling_merges_bins_exactly():
    gen = torch.Generator().manual_seed(4)
    small, large = torch.rand(10_000, generator=gen), torch.rand(10_000, generator=gen) * 3.5
    small[0] = 1.0  # the first batch sets the range to 1; the second doubles it twice
    hist = histogram_of(small, large)
    assert hist.range == 4.0 and hist.amax == large.max().item()
    direct = torch.histc(torch.cat([small, large]).double(), bins=BINS, min=0, max=4.0)
    # Exact but for the first range's top value (1.0): histc puts a value on the top edge in the last
    # bin, which the merge keeps below 1, while a direct histogram over [0, 4) counts it above.
    diff = torch.from_numpy(hist.counts) - direct
    assert diff[511] == 1 and diff[512] == -1 and diff.abs().sum() == 2


def test_non_finite_activations_are_refused():
    with pytest.raises(ConfigError, match="non-finite"):
        histogram_of(torch.tensor([1.0, math.inf]))


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="percentile, entropy, mse, max"):
        threshold(histogram_of(torch.rand(10)), "minmax")
    assert parse_method(method_name("percentile", 99.9)) == ("percentile", 99.9)
    assert parse_method("entropy")[0] == "entropy"


def test_weights_are_per_output_channel_symmetric():
    magnitudes = torch.logspace(-3, 1, 6, dtype=torch.float64).view(-1, 1, 1, 1)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * magnitudes
    w[2] = 0
    scales = weight_scales(w)
    q = quantize_weight(w, scales)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.equal(q[2], torch.zeros_like(q[2])) and scales[2] == 1
    for co in (0, 1, 3, 4, 5):
        assert q[co].abs().max() == 127  # every channel uses its whole range, however small
        assert (q[co].double() * scales[co] - w[co]).abs().max() <= scales[co] / 2 * (1 + 1e-12)


def test_histograms_cover_every_int8_value_of_the_plan():
    model = calibrated("resnet18", 10)
    plan = fastres.optimize(model, device="cpu", dtype="fp32", backend="torch").plan
    images = random_images(5, 32, 32, seed=5)
    histograms = collect_histograms(plan, images, batch=2)
    values = quantized_values(plan)
    assert set(histograms) == set(values) and "maxpool" in values and "bn1" not in values
    assert "layer4.1.add" not in values  # the head's input stays floating point
    assert all(h.counts.sum() > 0 for h in histograms.values())
    # The max-pool output's max |x| equals eager PyTorch's (BatchNorm folded: float32 rounding only).
    seen = {}
    hook = model.maxpool.register_forward_hook(lambda m, i, out: seen.setdefault("maxpool", out))
    with torch.inference_mode():
        model(images)
    hook.remove()
    assert histograms["maxpool"].amax == pytest.approx(seen["maxpool"].abs().max().item(), rel=1e-5)


def test_record_with_scales_round_trips_and_refuses_other_weights(tmp_path):
    model = calibrated("resnet18", 10)
    record = CalibrationRecord(
        model="resnet18", weights_sha256=weights_hash(model.state_dict()), method=method_name("entropy"),
        images=5, backend="triton", artifact="", fastres=fastres.__version__,
        scales={"maxpool": 0.031, "layer1.0.bn1": 0.5},
    )  # fmt: skip
    path = write_record(tmp_path / "c.json", record)
    again = read_record(path)
    assert again == record and again.scales["maxpool"] == 0.031
    check_record(again, path, model="resnet18", weights_sha256=record.weights_sha256, backend="triton")
    other = weights_hash(calibrated("resnet18", 10, seed=1).state_dict())
    with pytest.raises(CalibrationMismatchError, match="weights sha256"):
        check_record(again, path, model="resnet18", weights_sha256=other, backend="triton")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_positive_finite_threshold(method):
    hist = histogram_of(torch.randn(1000, generator=torch.Generator().manual_seed(6)).relu())
    t = threshold(hist, method)
    assert 0 < t <= hist.amax and math.isfinite(t)


def test_sqnr_and_the_layer_report_column():
    from fastres.cli.check import format_layer_report
    from fastres.engine import LayerError
    from fastres.numerics import sqnr_db

    ref = torch.randn(1000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    noise *= 0.1 * ref.norm() / noise.norm()  # noise power 1/100 of the signal's: 20 dB
    assert sqnr_db(ref + noise, ref) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == math.inf
    layers = [LayerError("conv1", "conv", 1e-4, 70.8), LayerError("layer1.0.conv1", "conv", 8e-2, 32.9)]
    report = format_layer_report(layers, sqnr=True)
    assert "SQNR  70.8 dB" in report and "SQNR  32.9 dB" in report
    assert "SQNR" not in format_layer_report(layers)
