"""`fastres classify` and fastres.classify: image folders in, top-k labels out (CPU, torch backend).

Expected predictions come from a path independent of the command: the test's own reference ResNet
in float64 on fastres.transforms' output, normalised by hand.
"""

import json
import re
import sys

import numpy as np
import pytest
import torch

import fastres
from fastres.classify import classify_files
from fastres.cli import main
from fastres.images import decode_image
from fastres.testing import make_calibrated_model, write_sample_images

Image = pytest.importorskip("PIL.Image", reason="Pillow (the images extra) is not installed")

NUM_CLASSES = 10
LABELS = [f"thing {i}" for i in range(NUM_CLASSES)]
SIZE = ["--resize", "40", "--crop", "32"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    module = make_calibrated_model("resnet18", NUM_CLASSES, seed=3)
    torch.save(module.state_dict(), root / "resnet18.pt")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return module, root / "resnet18.pt", root / "labels.txt"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Good images of several formats, modes and sizes (two in a subfolder), one corrupt, one non-image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(1, 256, (50, 70, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(1, 256, (64, 48, 3), dtype=np.uint8)).save(root / "b.JPG", quality=90)
    Image.fromarray(rng.integers(1, 256, (45, 45), dtype=np.uint8), mode="L").save(root / "sub" / "gray.png")
    rgba = rng.integers(1, 256, (40, 52, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(root / "sub" / "rgba.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image, not listed")
    good = [root / "a.png", root / "b.JPG", root / "sub" / "gray.png", root / "sub" / "rgba.png"]
    return root, good


def expected_top(module, files, topk, resize=40, crop=32):
    """(indices, probs) per file from the float64 reference on fastres.transforms' uint8 output."""
    t = fastres.transforms(model="resnet18", resize=resize, crop=crop)
    reference = module.double()
    out = []
    for f in files:
        x = t.normalize(t(decode_image(f))).double()[None]
        with torch.no_grad():
            probs = reference(x).softmax(dim=1)[0]
        top = probs.topk(topk)
        out.append((top.indices.tolist(), top.values.tolist()))
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def classify_args(model_files, *paths, extra=()):
    _, checkpoint, labels = model_files
    return ["classify", *paths, "--model", "resnet18", "--weights", checkpoint, "--labels", labels,
            "--device", "cpu", "--backend", "torch", "--no-progress", *SIZE, *extra]  # fmt: skip


def test_json_lines_match_the_reference_and_skip_the_corrupt_file(capsys, model_files, folder):
    root, good = folder
    code, out, err = run(capsys, *classify_args(model_files, root, extra=["--json", "--topk", "3"]))
    assert code == 1  # one file failed
    assert "broken.jpg" in err and "notes.txt" not in err + out
    assert sum("broken.jpg" in line for line in err.splitlines()) == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in rows] == [str(f) for f in good]  # sorted, recursive, corrupt one left out
    for row, (indices, probs) in zip(rows, expected_top(model_files[0], good, 3)):
        assert [p["index"] for p in row["topk"]] == indices
        assert [p["label"] for p in row["topk"]] == [LABELS[i] for i in indices]
        assert np.allclose([p["prob"] for p in row["topk"]], probs, rtol=1e-4, atol=1e-6)


def test_table_lists_each_file_with_labels_and_probabilities(capsys, model_files, folder):
    root, good = folder
    code, out, err = run(capsys, *classify_args(model_files, *good, extra=["--topk", "2", "--batch", "3"]))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.startswith("file") and "top-2" in header
    assert len(rows) == len(good)
    for row, f, (indices, probs) in zip(rows, good, expected_top(model_files[0], good, 2)):
        assert row.startswith(str(f) + "  ")
        cells = re.findall(r"(\S.*?) \((\d+\.\d)%\)", row[len(str(f)) :])
        assert [label for label, _ in cells] == [LABELS[i] for i in indices]
        # printed to 0.1 percentage point
        assert all(abs(float(shown) - 100 * p) <= 0.05 + 1e-4 for (_, shown), p in zip(cells, probs))


def test_topk_larger_than_the_classes_gives_every_class(capsys, model_files, folder):
    _, good = folder
    code, out, _ = run(capsys, *classify_args(model_files, good[0], extra=["--json", "--topk", "50"]))
    assert code == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert sorted(p["index"] for p in row["topk"]) == list(range(NUM_CLASSES))


@pytest.mark.parametrize(
    "paths, extra, message",
    [
        pytest.param(["missing"], [], "no such file", id="missing-path"),
        pytest.param(["empty"], [], "no images found", id="empty-folder"),
        pytest.param(["images"], ["--topk", "0"], "--topk", id="topk-0"),
        pytest.param(["images"], ["--std", "1", "0", "1"], "std", id="zero-std"),
        pytest.param(["images"], ["--crop", "-1"], "crop", id="negative-crop"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, tmp_path, model_files, folder, paths, extra, message):
    (tmp_path / "empty").mkdir()
    where = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "images": folder[0]}
    code, out, err = run(capsys, *classify_args(model_files, *[where[p] for p in paths], extra=extra))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fastres: error:") and message in err, err


def test_labels_file_with_the_wrong_count_is_exit_2(capsys, tmp_path, model_files, folder):
    _, good = folder
    short = tmp_path / "nine.txt"
    short.write_text("\n".join(LABELS[:9]) + "\n")
    argv = classify_args(model_files, good[0])
    argv[argv.index("--labels") + 1] = short
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("fastres: error:") and err.count("\n") == 1
    assert "9" in err and "10" in err


def test_random_weights_warn_once_on_generated_samples(capsys, tmp_path):
    samples = write_sample_images(tmp_path / "samples", count=3, height=40, width=60, seed=1)
    assert [decode_image(p).shape for p in samples] == [(3, 40, 60)] * 3
    code, out, err = run(
        capsys,
        "classify",
        tmp_path / "samples",
        "--model",
        "resnet18",
        "--device",
        "cpu",
        "--no-progress",
        *SIZE,
    )
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [str(p) for p in samples]
    assert err.count("random weights") == 1 and "UserWarning" not in err


# ---------------------------------------------------------------------------------------------
# The library function: grouping by size, order, prefetch on and off


@pytest.fixture(scope="module")
def engine(model_files):
    module, _, _ = model_files
    return fastres.optimize(module, device="cpu", backend="torch", labels=LABELS)


@pytest.mark.parametrize("workers", [pytest.param(0, id="no-prefetch"), pytest.param(3, id="3-threads")])
def test_mixed_sizes_without_crop_keep_order_and_match_one_at_a_time(engine, folder, workers):
    root, good = folder
    files = good + [root / "broken.jpg"] + good[::-1]  # a failure mid-stream, sizes interleaved
    t = fastres.transforms(model="resnet18", resize=36, crop=0)
    results = list(classify_files(engine, files, t, topk=3, batch=2, workers=workers, prefetch=2))
    assert [r.path for r in results] == files
    assert results[len(good)].predictions is None and "broken.jpg" in results[len(good)].error
    for r in results[: len(good)] + results[len(good) + 1 :]:
        alone = engine.predict(t(decode_image(r.path))[None], topk=3)[0]
        assert r.error is None and [p.index for p in r.predictions] == [p.index for p in alone]
        assert np.allclose([p.prob for p in r.predictions], [p.prob for p in alone], rtol=1e-4, atol=1e-6)


def test_bad_batch_or_topk_is_a_value_error(engine, folder):
    with pytest.raises(ValueError, match="batch"):
        list(classify_files(engine, folder[1], fastres.transforms(), batch=0))


def test_help_shows_examples(capsys):
    code, out, _ = run(capsys, "classify", "--help")
    assert code == 0 and "examples:" in out and "fastres classify " in out and "--json" in out


def test_without_pillow_the_command_says_which_extra_to_install(capsys, monkeypatch, folder):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import ...` now raises ImportError
    code, out, err = run(capsys, "classify", folder[0], "--model", "resnet18", "--device", "cpu")
    assert code == 2 and out == "" and err.count("\n") == 1 and "fastres[images]" in err


def test_a_decode_bomb_file_is_refused_from_its_header(capsys, monkeypatch, tmp_path, model_files, folder):
    from PIL import ImageFile
    from serve_support import single_colour_png  # imports Pillow, which this module may skip without

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(single_colour_png(13000, 13000))  # 555 KB claiming 169 megapixels
    good = folder[1][0]
    loads = []
    real_load = ImageFile.ImageFile.load

    def load(image, *args, **kwargs):  # records what gets decoded, by size
        loads.append(image.size)
        return real_load(image, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    code, out, err = run(capsys, *classify_args(model_files, bomb, good, extra=["--json", "--workers", "0"]))
    assert code == 1, err  # one file refused
    assert "bomb.png is 13000x13000 (169000000 pixels), over the limit of 120000000 pixels" in err, err
    assert [json.loads(line)["file"] for line in out.splitlines()] == [str(good)]
    assert (13000, 13000) not in loads and loads, loads  # the good file was decoded, the bomb never
