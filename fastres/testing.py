"""Realistic random networks for tests, checks and benchmarks (no download needed).

Freshly initialised BatchNorm layers have running mean 0 and variance 1, which makes deep nets
explode (resnet152 activations reach ~1e16, past fp16's range) and leaves BN folding untested.
Here every BN gets random affine parameters and running statistics calibrated on random images
with a train-mode pass and cumulative averaging, so the network behaves like a trained one.
"""

from __future__ import annotations

import torch
from torch import nn

from .reference import ResNet, build_resnet
from .specs import ResNetSpec


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, batches: int = 1) -> nn.Module:
    """Replace BN running statistics by their cumulative average over `images` (train-mode pass)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for chunk in images.chunk(batches):
        model(chunk)
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return model


@torch.no_grad()
def randomize_batchnorm_affine(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random BN gamma in [0.5, 1.5) and beta in [-0.25, 0.25): folding must carry both."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.copy_((torch.rand(m.bias.shape, generator=generator) - 0.5) * 0.5)
    return model


def random_images(batch: int, height: int = 64, width: int = 64, *, seed: int = 0) -> torch.Tensor:
    """Normalised-image-like random input (standard normal), never zeros."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=g)


def make_calibrated_model(
    spec: ResNetSpec | str,
    num_classes: int = 1000,
    *,
    seed: int = 0,
    calibration_images: int = 8,
    image_size: int = 64,
) -> ResNet:
    """A reference ResNet in eval mode with random weights and calibrated BN statistics."""
    torch.manual_seed(seed)
    model = build_resnet(spec, num_classes)
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_batchnorm_affine(model, generator)
    with torch.no_grad():
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=generator) * 0.1)
    images = random_images(calibration_images, image_size, image_size, seed=seed + 2)
    calibrate_batchnorm(model, images)
    return model.eval()


def write_sample_images(
    folder, count: int = 8, height: int = 375, width: int = 500, *, seed: int = 0
) -> list:
    """Write `count` photo-like JPEGs (smooth colour fields plus noise) into `folder`; returns their paths.

    For demos and benchmarks of `fastres classify` without a data set: ImageNet-like size, file size
    and decode cost, nothing to download. Needs Pillow (the images extra).
    """
    from pathlib import Path

    import numpy as np

    from .images import require_pillow

    Image, _ = require_pillow()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(-3, 3, (3, 3))
        field = np.stack([np.sin(a[k] * xx + b[k] * yy + c[k]) for k in range(3)], axis=2)
        pixels = 127.5 + 100 * field + rng.normal(0, 12, (height, width, 3))
        path = folder / f"sample_{i:03d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths
