"""The command line (fastres/cli/), run in-process through main(argv), plus subprocess smoke tests."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import BENCH_ROW_COLUMNS

import fastres
from fastres.cli import main
from fastres.errors import ConfigError

SUBCOMMANDS = ("bench", "info", "check", "compile-report")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_model_is_one_line_listing_valid_names(capsys):
    code, out, err = run_cli(capsys, "info", "resnet51")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fastres: error: unknown model 'resnet51'")
    assert all(name in err for name in fastres.list_models())


@pytest.mark.parametrize("command", ["bench", "info", "check"])
def test_bad_dtype_is_one_line(capsys, command):
    code, _, err = run_cli(capsys, command, "resnet18", "--dtype", "fp4")
    assert code == 2 and err.count("\n") == 1 and "fp4" in err and "fp16" in err


def test_missing_images_file_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "check", "resnet18", "--device", "cpu", "--images", str(tmp_path / "no.pt")
    )
    assert code == 2 and err.count("\n") == 1 and "not found" in err


def test_bad_arch_is_one_line(capsys):
    code, _, err = run_cli(capsys, "compile-report", "resnet18", "--arch", "sm_75", "--dtype", "fp16")
    assert code == 2 and err.count("\n") == 1 and "sm_90" in err


def test_internal_value_error_is_a_traceback_not_exit_2(capsys, monkeypatch):
    def buggy_planner(*args, **kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr("fastres.planner.plan_resnet", buggy_planner)
    with pytest.raises(ValueError, match="internal invariant broken"):
        main(["info", "resnet18"])
    assert capsys.readouterr().err == ""


def test_user_error_from_inside_a_command_is_exit_2(capsys, monkeypatch):
    def refusing_planner(*args, **kwargs):
        raise ConfigError("the planner refuses this option; use another")

    monkeypatch.setattr("fastres.planner.plan_resnet", refusing_planner)
    code, out, err = run_cli(capsys, "info", "resnet18")
    assert code == 2 and out == ""
    assert err == "fastres: error: the planner refuses this option; use another\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "resnet18", "--batch", "0"], "--batch and --image-size must be at least 1"),
        (["bench", "resnet18", "--device", "cpu", "--compare", "eagre"], "--compare takes eager, compile"),
    ],
)
def test_bad_option_value_is_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_no_command_is_an_error(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and err.startswith("fastres: error:")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_examples(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "examples:" in out and f"fastres {command} " in out


def test_info_prints_the_plan_and_totals(capsys):
    code, out, _ = run_cli(capsys, "info", "resnet50")
    assert code == 0
    assert "layer4.2.conv3" in out and "bias+residual+relu" in out
    assert "fused :" in out and "eager :" in out and "memory traffic saved" in out


def test_info_reads_a_checkpoint(capsys, tmp_path):
    from fastres.reference import build_resnet

    path = tmp_path / "model.pth"
    torch.save(build_resnet("resnet18", 10).state_dict(), path)
    code, out, _ = run_cli(capsys, "info", str(path), "--batch", "2", "--dtype", "fp32")
    assert code == 0 and "resnet18" in out and "10 classes" in out and "2x3x224x224" in out


@pytest.fixture
def one_thread():
    """Plumbing, not speed: one thread avoids OpenMP oversubscription on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_writes_csv_and_json(capsys, tmp_path, one_thread):
    out_dir = tmp_path / "results"
    code, out, _ = run_cli(
        capsys,
        "bench",
        "resnet18",
        "--device",
        "cpu",
        "--batch",
        "1",
        "2",
        "--image-size",
        "64",
        "--repeats",
        "3",
        "--backend",
        "torch",
        "--compare",
        "eager",
        "--out",
        str(out_dir),
    )
    assert code == 0
    assert "fastres" in out and "eager-channels-last" in out and "median ms" in out
    csv_files, json_files = list(out_dir.glob("*.csv")), list(out_dir.glob("*.json"))
    assert len(csv_files) == 1 and len(json_files) == 1
    with open(csv_files[0]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["batch"], r["candidate"]) for r in rows] == [
        (b, c) for b in ("1", "2") for c in ("fastres", "eager", "eager-channels-last")
    ]
    for column in (*BENCH_ROW_COLUMNS, "speedup_vs_eager"):
        assert column in rows[0], column
    assert all(float(r["median_ms"]) > 0 and r["samples"] == "3" for r in rows)
    data = json.loads(json_files[0].read_text())
    assert len(data) == 6 and data[0]["image_size"] == 64 and data[0]["dtype"] == "float32"
    has_matplotlib = shutil.which("python") is not None and _importable("matplotlib")
    assert bool(list(out_dir.glob("*.png"))) == has_matplotlib
    if not has_matplotlib:
        assert "pip install fastres[plot]" in out


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_check_passes_and_shows_the_layer_report(capsys, one_thread):
    code, out, _ = run_cli(
        capsys,
        "check",
        "resnet18",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--image-size",
        "64",
        "--backend",
        "torch",
    )
    assert code == 0, out
    assert "top-1 agreement" in out and "per-layer relative error" in out
    assert "layer4.1.conv2" in out and "PASS" in out


def test_layer_report_marks_where_drift_starts():
    from fastres.cli.check import format_layer_report
    from fastres.engine import LayerError

    layers = [
        LayerError("conv1", "conv", 1e-7),
        LayerError("layer1", "conv", 5e-7),
        LayerError("layer2", "conv", 2e-6),
        LayerError("head", "head", 3e-6),
    ]
    lines = format_layer_report(layers).splitlines()
    assert "drift starts" in lines[3] and lines[3].lstrip().startswith("layer2")
    assert sum("drift starts (" in line for line in lines) == 1


def test_version_through_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "fastres", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"fastres {fastres.__version__}")


def test_console_script_smoke():
    exe = shutil.which(
        "fastres", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    if exe is None:
        pytest.skip("the fastres console script is not installed (pip install -e .)")
    done = subprocess.run([exe, "info", "resnet18", "--dtype", "bf16"], capture_output=True, text=True)
    assert done.returncode == 0 and "fused :" in done.stdout
    done = subprocess.run([exe, "info", "nonet"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_output_into_a_closed_pipe_is_not_a_traceback():
    import subprocess
    import sys

    # `fastres info resnet50 | head -n 1`: the reader leaves after one line.
    writer = subprocess.Popen(
        [sys.executable, "-m", "fastres", "info", "resnet152", "--batch", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    writer.stdout.readline()
    writer.stdout.close()
    _, err = writer.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert writer.returncode in (0, 141)
