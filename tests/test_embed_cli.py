"""`fastres embed` end to end (image files in, an N x D matrix and its JSONL index out) and `fastres info`'s
outputs line; the engine side of backbones and embeddings is tests/test_backbone.py."""

import pytest
import torch
from e2e import calibrated

import fastres


@pytest.fixture(scope="module")
def embed_inputs(tmp_path_factory):
    pytest.importorskip("PIL.Image", reason="Pillow (the images extra) is not installed")
    from fastres.testing import write_sample_images

    root = tmp_path_factory.mktemp("embed")
    model = calibrated("resnet18", 10)
    torch.save(model.state_dict(), root / "resnet18.pt")
    files = write_sample_images(root / "images", count=5, height=40, width=50, seed=7)
    return root, files


def run_embed(root, *extra):
    from fastres.cli import main

    argv = ["embed", str(root / "images"), "--model", "resnet18", "--weights", str(root / "resnet18.pt")]
    argv += ["--backend", "torch", "--dtype", "fp32"]  # compared with a torch-backend engine
    return main([*argv, "--resize", "40", "--crop", "32", "--batch", "2", "--workers", "2", *extra])


def expected_embeddings(root, files, normalize=False):
    """engine.embed on the images fastres.transforms makes of the files, decoded here, in one batch."""
    from fastres.images import decode_image

    transform = fastres.transforms(model="resnet18", resize=40, crop=32)
    images = torch.stack([transform(decode_image(f)) for f in files])
    engine = fastres.load("resnet18", root / "resnet18.pt", device="cpu", backend="torch", dtype="fp32")
    return engine.embed(images, normalize=normalize)


def test_embed_command_writes_rows_in_file_order_with_an_index(embed_inputs, capsys):
    import json

    import numpy as np

    root, files = embed_inputs
    out = root / "embeddings.npy"
    assert run_embed(root, "--out", str(out)) == 0
    rows = np.load(out)
    assert rows.shape == (5, 512) and rows.dtype == np.float32
    index = [json.loads(line) for line in (root / "embeddings.jsonl").read_text().splitlines()]
    assert index == [{"index": i, "path": str(f)} for i, f in enumerate(sorted(files))]
    expected = expected_embeddings(root, sorted(files))
    torch.testing.assert_close(torch.from_numpy(rows), expected, rtol=1e-5, atol=1e-5)
    assert "5 x 512 float32" in capsys.readouterr().err


def test_embed_command_normalised_safetensors_and_a_bad_file(embed_inputs, capsys):
    safetensors = pytest.importorskip("safetensors.torch")
    root, files = embed_inputs
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    try:
        out = root / "unit.safetensors"
        assert run_embed(root, "--out", str(out), "--normalize") == 1  # a file was skipped
    finally:
        (root / "images" / "broken.jpg").unlink()
    rows = safetensors.load_file(str(out))["embeddings"]
    torch.testing.assert_close(
        rows, expected_embeddings(root, sorted(files), normalize=True), rtol=1e-5, atol=1e-5
    )
    assert len((root / "unit.jsonl").read_text().splitlines()) == 5
    assert "broken.jpg" in capsys.readouterr().err


def test_embed_command_without_safetensors_is_a_one_line_error(embed_inputs, capsys, monkeypatch):
    import sys

    root, _ = embed_inputs
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as when not installed
    assert run_embed(root, "--out", str(root / "x.npy"), "--format", "safetensors") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install fastres[safetensors]" in err
    assert not (root / "x.npy").exists()


def test_info_shows_the_outputs(capsys):
    from fastres.cli import main

    assert main(["info", "resnet18", "--image-size", "64"]) == 0
    assert "outputs: logits 1x1000 float32" in capsys.readouterr().out
    assert main(["info", "resnet18", "--image-size", "64", "--features", "stem,layer2"]) == 0
    out = capsys.readouterr().out
    assert "outputs: stem 1x64x32x32, layer2 1x128x8x8" in out and "layer3.0" not in out
    assert main(["info", "resnet18", "--image-size", "64", "--num-classes", "0"]) == 0
    assert "outputs: pool 1x512 float32" in capsys.readouterr().out


def test_embed_help_shows_examples(capsys):
    from fastres.cli import main

    assert main(["embed", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "fastres embed " in out and "--normalize" in out
