"""Never silently wrong: a NaN or Inf pixel makes that image's logits NaN on every backend, as eager
PyTorch does, and leaves the other images of the batch as they were."""

import subprocess
import sys
import warnings

import pytest
import torch
from e2e import calibrated

import fastres
from fastres.testing import random_images


def _corrupt(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 0, 5, 7] = float("nan")
    x[2, 2, 0, 0] = float("inf")
    x[3, 1, 9, 3] = float("-inf")
    return x


def _assert_only_corrupt_images_are_nan(engine, x):
    clean = engine(x)
    assert torch.isfinite(clean).all()
    out = engine(_corrupt(x))
    for image in (1, 2, 3):
        assert out[image].isnan().all(), f"image {image}: {int(out[image].isnan().sum())} NaN logits"
    torch.testing.assert_close(out[[0, 4]], clean[[0, 4]], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_non_finite_pixels_give_nan_logits(backend):
    model = calibrated("resnet18", 10)
    with torch.inference_mode():  # the cached model's parameters may be inference tensors by now
        eager = model(_corrupt(random_images(5, 40, 40, seed=11)))
    assert eager[1:4].isnan().all(), "eager PyTorch itself gives NaN logits for these images"
    engine = fastres.optimize(model, device="cpu", dtype=torch.float32, backend=backend)
    _assert_only_corrupt_images_are_nan(engine, random_images(5, 40, 40, seed=11))


@pytest.mark.interpreter
@pytest.mark.slow
def test_non_finite_pixels_give_nan_logits_on_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device=device, dtype=torch.float32, backend="triton")
    _assert_only_corrupt_images_are_nan(engine, random_images(5, 24, 24, seed=12).to(device))


def test_load_without_weights_is_the_same_network_every_time():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state = torch.random.get_rng_state()
        first = fastres.load("resnet18", num_classes=10, device="cpu", backend="torch")
        assert torch.equal(torch.random.get_rng_state(), state), "load must not move the caller's RNG"
        second = fastres.load("resnet18", num_classes=10, device="cpu", backend="torch")
    x = random_images(2, 32, 32, seed=13)
    torch.testing.assert_close(first(x), second(x), rtol=0, atol=0)


def test_newcomer_paths(tmp_path):
    # The README's `fastres.testing.write_sample_images(folder)` right after `import fastres`.
    code = "import fastres, sys; print(len(fastres.testing.write_sample_images(sys.argv[1], count=1)))"
    # A misspelled model name gets a suggestion.
    with pytest.raises(fastres.UnknownModelError, match="did you mean 'resnet50'"):
        fastres.get_spec("resnet-50")
    printed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    assert printed.stdout.strip() == b"1" and len(list(tmp_path.glob("*.jpg"))) == 1
    from fastres.classify import summary

    assert summary(1, 0, 1.0).startswith("classified 1 image in")


def test_garbage_checkpoint_and_empty_image_say_what_is_wrong(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(torch.randint(0, 256, (3000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(fastres.CheckpointError) as info:
        fastres.load("resnet18", weights=garbage)
    message = str(info.value)
    assert "3000 bytes" in message and "corrupt" in message and "Re-download or re-save" in message
    assert "weights_only" not in message, "torch's weights_only advice does not help with a corrupt file"
    pytest.importorskip("PIL")
    from fastres.images import decode_image

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(fastres.ImageDecodeError, match="empty"):
        decode_image(empty)
