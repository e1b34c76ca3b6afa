"""`fastres serve` options and start-up errors that need no running Ray instance."""

import sys

import pytest
import torch

from fastres.cli import main
from fastres.serving import ServeConfig
from fastres.testing import make_calibrated_model


def test_config_names_and_limits():
    assert ServeConfig("resnet50").model_name == "resnet50"
    assert ServeConfig("/ckpt/birds-v2.pth").model_name == "birds-v2"
    assert ServeConfig("/ckpt/best.pt", name="birds").model_name == "birds"
    with pytest.raises(ValueError, match="use --name"):
        ServeConfig("resnet50", name="my model")
    with pytest.raises(ValueError, match="must be positive"):
        ServeConfig("resnet50", max_batch=0)
    with pytest.raises(ValueError, match="batch_wait_ms >= 0"):
        ServeConfig("resnet50", batch_wait_ms=-1)


def test_without_ray_the_cli_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["serve", "resnet18"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'fastres[serve]'" in err[0], err


@pytest.mark.parametrize("problem", ["truncated-checkpoint", "labels-count"])
def test_bad_inputs_fail_in_one_line_before_ray_starts(tmp_path, capsys, problem):
    ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'fastres[serve]'")
    weights = tmp_path / "birds.pth"
    torch.save(make_calibrated_model("resnet18", 10, image_size=32).state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"bird {i}" for i in range(10 if problem != "labels-count" else 9)) + "\n")
    if problem == "truncated-checkpoint":
        weights.write_bytes(weights.read_bytes()[:1000])
    argv = ["serve", "resnet18", "--weights", str(weights), "--labels", str(labels), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = "not a readable PyTorch checkpoint" if problem == "truncated-checkpoint" else "9 names"
    assert len(err) == 1 and expected in err[0], err
    assert not ray.is_initialized()
