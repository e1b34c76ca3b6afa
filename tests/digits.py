"""A ResNet-18 trained in the test suite on digits it draws itself: a model with confident, meaningful
predictions, on which a low-precision engine's top-1 agreement says something (a random network's
top classes are nearly tied, so any rounding flips them).

The data: the ten digits as 5x3 bitmaps, scaled to a random size, placed at a random offset in a
32x32 image, in a random colour on a random background, with pixel noise. Training takes about half
a minute on 2 cores and is cached per test session.
"""

import functools

import torch
from torch import nn

from fastres.graph import normalize
from fastres.reference import build_resnet
from fastres.specs import IMAGENET_MEAN, IMAGENET_STD

GLYPHS = (
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
    "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111",
)  # fmt: skip
SIZE = 32


def digit_images(count: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 count x 3 x 32 x 32 pixels, int64 labels)."""
    gen = torch.Generator().manual_seed(seed)
    glyphs = torch.tensor([[int(c) for c in g] for g in GLYPHS], dtype=torch.float32).view(10, 1, 5, 3)
    labels = torch.randint(0, 10, (count,), generator=gen)
    images = torch.empty(count, 3, SIZE, SIZE)
    for i in range(count):
        scale = int(torch.randint(3, 6, (1,), generator=gen))
        glyph = glyphs[labels[i]].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        h, w = glyph.shape[1:]
        top = int(torch.randint(0, SIZE - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, SIZE - w + 1, (1,), generator=gen))
        background, ink = (
            torch.rand(3, 1, 1, generator=gen) * 0.5,
            0.5 + torch.rand(3, 1, 1, generator=gen) * 0.5,
        )
        canvas = background.expand(3, SIZE, SIZE).clone()
        region = canvas[:, top : top + h, left : left + w]
        canvas[:, top : top + h, left : left + w] = torch.where(glyph > 0, ink.expand_as(region), region)
        images[i] = canvas + 0.05 * torch.randn(3, SIZE, SIZE, generator=gen)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


@functools.cache
def trained_digits_model(steps: int = 200, batch: int = 64) -> nn.Module:
    """ResNet-18 (10 classes) trained on drawn digits; eval mode, float32. Reaches ~100% on fresh digits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_resnet("resnet18", 10)
        pixels, labels = digit_images(steps * batch // 4, seed=1)  # each image seen about 4 times
        x = normalize(pixels, IMAGENET_MEAN, IMAGENET_STD).float()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
        model.train()
        for _ in range(steps):
            index = torch.randint(0, x.shape[0], (batch,))
            loss = nn.functional.cross_entropy(model(x[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD).float())
    return (logits.argmax(1) == labels).double().mean().item()


@functools.cache
def quantization_case(calibration_images: int = 48, test_images: int = 64):
    """What the int8 and fp8 engine tests share: (model, calibration pixels, test pixels, the fp32 top-1
    of the test pixels, the folded plan)."""
    import fastres

    model = trained_digits_model()
    calibration, _ = digit_images(calibration_images, seed=21)
    test, _ = digit_images(test_images, seed=22)
    reference = fastres.optimize(model, device="cpu", dtype="fp32", backend="torch")
    with torch.inference_mode():
        fp32_top1 = reference(test).argmax(1)
    return model, calibration, test, fp32_top1, reference.plan


def normalised(plan, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as the plan's float32 input (its mean and std)."""
    return normalize(pixels, plan.mean, plan.std).float()
