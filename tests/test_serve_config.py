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
    with pytest.raises(ValueError, match="body_timeout_s must be positive"):
        ServeConfig("resnet50", body_timeout_s=0)


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


@pytest.fixture
def captured(monkeypatch):
    """`fastres serve`'s arguments as serve_forever receives them; nothing starts."""
    import fastres.serving

    calls = []
    monkeypatch.setattr(
        fastres.serving, "serve_forever", lambda config, **options: calls.append((config, options)) or 0
    )
    monkeypatch.delenv("FASTRES_API_KEY", raising=False)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_a_non_loopback_host_without_a_key_warns_in_one_line(captured, capsys, host):
    assert main(["serve", "resnet18", "--host", host]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without an API key" in err[0] and host in err[0], err
    assert captured[0][0].api_key is None and captured[0][1]["host"] == host


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_or_a_key_does_not_warn(captured, capsys, monkeypatch, host):
    assert main(["serve", "resnet18", "--host", host]) == 0
    assert main(["serve", "resnet18", "--host", "0.0.0.0", "--api-key", "k1"]) == 0
    monkeypatch.setenv("FASTRES_API_KEY", "k2")
    assert main(["serve", "resnet18", "--host", "0.0.0.0"]) == 0
    assert capsys.readouterr().err == ""
    assert [config.api_key for config, _ in captured] == [None, "k1", "k2"]
    assert "k2" not in repr(captured[2][0])  # the key stays out of logs that print the config


def test_api_key_must_fit_in_a_header():
    with pytest.raises(ValueError, match="printable ASCII"):
        ServeConfig("resnet50", api_key="with space")


def test_tune_flag_reaches_the_replicas_config(captured):
    assert main(["serve", "resnet18"]) == 0 and main(["serve", "resnet18", "--tune"]) == 0
    assert [config.tune for config, _ in captured] == [False, True]
