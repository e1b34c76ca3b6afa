"""The bench harness (fastres/tools/bench.py): statistics, interleaving, row metadata, output files."""

import csv
import json

import pytest
import torch
from helpers import BENCH_ROW_COLUMNS

from fastres.backends.openvino_backend import openvino_available
from fastres.cli import main
from fastres.errors import ConfigError
from fastres.tools import bench, bench_report, environment

openvino = pytest.importorskip("openvino") if openvino_available() else None


@pytest.mark.parametrize(
    "samples, median, p90",
    [
        pytest.param([5.0], 5.0, 5.0, id="one"),
        pytest.param([1.0, 2.0], 1.5, 1.9, id="two"),
        pytest.param([float(i) for i in range(1, 11)], 5.5, 9.1, id="1-to-10"),
        pytest.param([9.0, 1.0, 5.0, 3.0, 7.0], 5.0, 8.2, id="unsorted"),
        pytest.param([float(i) for i in range(101)], 50.0, 90.0, id="0-to-100"),
    ],
)
def test_percentiles_of_known_samples(samples, median, p90):
    assert bench.percentile(samples, 50) == pytest.approx(median)
    assert bench.percentile(samples, 90) == pytest.approx(p90)


def test_summarize_reports_milliseconds():
    stats = bench.summarize([0.001, 0.002, 0.003, 0.010])
    assert stats.median_ms == pytest.approx(2.5)
    assert stats.p90_ms == pytest.approx(7.9)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.samples == 4


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_interleaved_order_rotates_the_first_candidate():
    assert bench.interleaved_order(["a", "b", "c"], 3) == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_measure_interleaved_runs_round_robin_and_drops_a_failing_candidate():
    calls: list[str] = []

    def make(name, fail_at=None):
        def fn():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError("boom\nsecond line")

        return fn

    fake_clock = iter(range(1, 1000))
    timer = lambda fn: (fn(), next(fake_clock))[1]
    samples, errors = bench.measure_interleaved(
        {"fastres": make("fastres"), "eager": make("eager"), "bad": make("bad", fail_at=2)}, 3, timer
    )
    assert calls == ["fastres", "eager", "bad", "eager", "bad", "fastres", "fastres", "eager"]
    # The fake clock advances once per completed call; the failing call is not timed.
    assert samples["fastres"] == [1, 5, 6] and samples["eager"] == [2, 4, 7] and samples["bad"] == [3]
    assert errors == {"bad": "RuntimeError: boom"}


def test_environment_has_the_record_fields():
    env = environment.environment(torch.device("cpu"))
    for key in ("device_name", "torch", "triton", "fastres", "git_rev", "date_utc"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["date_utc"].endswith("+00:00")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests check plumbing, not speed; two OpenMP threads on a loaded 2-core machine make every
    call many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = bench.BenchConfig(
        "resnet18", batches=[1, 2], device="cpu", image_size=32, repeats=2, warmup=0, progress=False
    )
    return bench.run_benchmark(config), tmp_path_factory.mktemp("bench")


def test_rows_carry_metadata_and_timings(tiny_run):
    result, _ = tiny_run
    rows = result.rows
    # With OpenVINO installed the default CPU backend is openvino, shown beside fastres on the torch
    # backend, and OpenVINO run directly on the module is an anchor.
    ov = openvino_available()
    candidates = ("fastres", "fastres-torch", "eager", "eager-channels-last", "openvino")
    candidates = candidates if ov else ("fastres", "eager", "eager-channels-last")
    assert [(r["batch"], r["candidate"]) for r in rows] == [(b, c) for b in (1, 2) for c in candidates]
    backends = {"fastres": "openvino" if ov else "torch", "fastres-torch": "torch"}
    for r in rows:
        for key in (*BENCH_ROW_COLUMNS, "mem_method"):
            assert key in r, key
        assert r["error"] is None and r["samples"] == 2
        assert r["p90_ms"] >= r["median_ms"] > 0
        assert (
            r["dtype"] == "float32" and r["device"] == "cpu" and r["backend"] == backends.get(r["candidate"])
        )
        assert r["cpu_isa"] is not None and r["openvino"] == (openvino.__version__ if ov else None)
    fast = [r for r in rows if r["candidate"] == "fastres"]
    assert all(r["cold_load_s"] > 0 and r["warm_load_s"] > 0 and r["fastres_speedup"] == 1.0 for r in fast)
    assert all(r["speedup_vs_eager"] > 0 for r in fast)


def test_float32_anchors_run_with_fastres_arithmetic(monkeypatch):
    """PyTorch's default runs cuDNN convs in TF32: the eager fp32 anchors would then not be fp32 at
    all. They run as fastres does (IEEE fp32), the rows say so, and the flags are restored after."""
    from fastres.tools import bench_candidates

    seen = []
    make = bench_candidates.anchor_candidates

    def spying(*args, **kwargs):
        out = make(*args, **kwargs)
        for cand in out:
            fn = cand.fn
            cand.fn = lambda x, fn=fn: seen.append(torch.backends.cudnn.allow_tf32) or fn(x)
        return out

    monkeypatch.setattr(bench, "anchor_candidates", spying)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default
    config = bench.BenchConfig("resnet18", batches=[1], device="cpu", image_size=32, repeats=1, warmup=0,
                               progress=False, backend="torch", compare=["eager"])  # fmt: skip
    rows = bench.run_benchmark(config).rows
    assert seen and set(seen) == {False} and all(r["tf32"] is False for r in rows)
    assert torch.backends.cudnn.allow_tf32 is True


def test_compile_failure_is_a_row_not_a_crash(monkeypatch):
    def broken_compile(module, **kwargs):
        def run(x):
            raise RuntimeError("inductor exploded\ntraceback lines")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    config = bench.BenchConfig(
        "resnet18",
        batches=[1],
        device="cpu",
        image_size=32,
        compare=["compile"],
        backend="torch",
        repeats=1,
        warmup=0,
        progress=False,
    )
    rows = bench.run_benchmark(config).rows
    assert [r["candidate"] for r in rows] == ["fastres", "compile-default"]
    assert rows[0]["error"] is None and rows[0]["median_ms"] > 0
    assert rows[1]["error"] == "RuntimeError: inductor exploded" and rows[1]["median_ms"] is None


def test_write_results_gives_parsable_csv_and_json(tiny_run):
    result, out = tiny_run
    paths, _ = bench_report.write_results(result.rows, out, "run", plot=False)
    with open(out / "run.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result.rows) and table[0]["candidate"] == "fastres"
    assert json.loads((out / "run.json").read_text())[0]["model"] == "resnet18"
    assert "speedup_vs_eager-channels-last" in table[0]
    text = bench_report.format_table(result.rows)
    assert "eager-channels-last" in text and "median ms" in text


def _row(candidate: str, median: float, p90: float, load: float | None = 0.1) -> dict:
    return {"batch": 8, "candidate": candidate, "median_ms": median, "p90_ms": p90,
            "throughput_img_s": 8e3 / median, "fastres_speedup": 1.0, "first_result_s": 0.5,
            "peak_mem_mb": 10.0, "error": None, "device": "cpu", "load_avg_1m": load}  # fmt: skip


def test_a_disturbed_run_is_flagged_under_the_table():
    quiet = [_row("fastres", 199.0, 205.0), _row("eager", 327.0, 330.0)]
    assert bench_report.disturbance_note(quiet, cores=2) is None
    text = bench_report.format_table(quiet)
    assert "WARNING" not in text and "noisy" not in text
    spread = [_row("fastres", 1040.0, 1900.0), _row("eager", 327.0, 330.0)]
    table = bench_report.format_table(spread)
    assert "noisy" in table.splitlines()[2] and "noisy" not in table.splitlines()[3]
    assert "WARNING: this run was disturbed" in table and "1 row(s)" in table
    loaded = [_row("fastres", 199.0, 205.0, load=3.5)]
    assert "load average reached 3.5 on 2 cores" in bench_report.disturbance_note(loaded, cores=2)


@pytest.mark.slow  # plumbing, not a kernel test: not in CI's Triton 3.6 interpreter stage
def test_bench_runs_a_quantized_triton_engine():
    """`fastres bench --dtype fp8` on the triton backend (the interpreter here): calibrated on random
    images, timed beside eager float32; never tuned (a Triton int8 or fp8 engine has no tuned choices,
    and bench crashed looking for them; int8 takes the same path)."""
    dtype = torch.float8_e4m3fn
    config = bench.BenchConfig(
        "resnet18", batches=[1], device="cpu", dtype=dtype, backend="triton", image_size=32,
        repeats=1, warmup=0, progress=False, compare=("eager",),
    )  # fmt: skip
    rows = {r["candidate"]: r for r in bench.run_benchmark(config).rows}
    assert set(rows) == {"fastres", "eager", "eager-channels-last"}
    assert rows["fastres"]["error"] is None and rows["fastres"]["median_ms"] > 0
    assert rows["fastres"]["backend"] == "triton" and rows["eager"]["error"] is None


def test_compile_modes_choose_the_torch_compile_anchors(monkeypatch):
    modes = []

    def fake_compile(module, mode=None, **kwargs):
        modes.append(mode)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = bench.BenchConfig(
        "resnet18", batches=[1], device="cpu", image_size=32, compare=["compile"], backend="torch",
        compile_modes=["reduce-overhead"], repeats=1, warmup=0, progress=False,
    )  # fmt: skip
    rows = bench.run_benchmark(config).rows
    assert modes == ["reduce-overhead"]
    assert [r["candidate"] for r in rows] == ["fastres", "compile-reduce-overhead"]
    assert rows[1]["error"] is None and rows[1]["median_ms"] > 0


@pytest.mark.parametrize(
    "compare, modes, message",
    [
        (["compile"], ["reduce-overhaed"], "--compile-modes takes default, reduce-overhead"),
        (["eager"], ["reduce-overhead"], "--compile-modes needs compile in --compare"),
    ],
)
def test_bad_compile_modes_are_refused_before_any_work(compare, modes, message):
    config = bench.BenchConfig("resnet18", device="cpu", compare=compare, compile_modes=modes)
    with pytest.raises(ConfigError, match=message):
        bench.run_benchmark(config)


def test_compile_modes_on_the_command_line(capsys):
    argv = [
        "bench",
        "resnet18",
        "--device",
        "cpu",
        "--compare",
        "eager",
        "--compile-modes",
        "reduce-overhead",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err == "fastres: error: --compile-modes needs compile in --compare\n"


def test_a_bench_stopped_mid_run_leaves_csv_and_json_of_what_it_measured(capsys, tmp_path, monkeypatch):
    """SIGINT (gpu_check.sh's time limit) during batch 2's timing: batch 1's rows are on disk, and
    batch 2's first calls as provisional rows; the table so far is printed, exit status 130."""
    timed = []

    def interrupted_on_the_second_batch(*args, **kwargs):
        timed.append(1)
        if len(timed) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    measure = bench.measure_interleaved
    monkeypatch.setattr(bench, "measure_interleaved", interrupted_on_the_second_batch)
    argv = ["bench", "resnet18", "--device", "cpu", "--batch", "1", "2", "--image-size", "32", "--repeats",
            "2", "--warmup", "0", "--backend", "torch", "--compare", "eager", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 130
    out = capsys.readouterr().out
    assert "saved the rows so far" in out and bench.PENDING in out
    (json_path,), (csv_path,) = tmp_path.glob("*.json"), tmp_path.glob("*.csv")
    rows = json.loads(json_path.read_text())
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    names = ["fastres", "eager", "eager-channels-last"]
    assert [(r["batch"], r["candidate"]) for r in rows] == [(b, c) for b in (1, 2) for c in names]
    assert all(r["error"] is None and r["median_ms"] > 0 for r in rows[:3])
    assert all(r["error"] == bench.PENDING and r["median_ms"] is None for r in rows[3:])
    assert all(r["first_result_s"] > 0 for r in rows)
    assert not list(tmp_path.glob("*.png"))  # the plot is drawn at the end only


def test_a_bench_stopped_mid_timing_keeps_the_samples_it_took(capsys, tmp_path, monkeypatch):
    """SIGINT after batch 2's fourth timed call: its rows have medians from the samples taken (the
    samples column says how few), not only 'not timed'."""
    calls = []
    timer = bench.cpu_timer

    def stopped_in_the_second_batch(fn):
        calls.append(1)
        if len(calls) == 3 * 3 + 5:  # batch 1: 3 candidates x 3 repeats; then 4 of batch 2 taken
            raise KeyboardInterrupt
        return timer(fn)

    monkeypatch.setattr(bench, "cpu_timer", stopped_in_the_second_batch)
    argv = ["bench", "resnet18", "--device", "cpu", "--batch", "1", "2", "--image-size", "32", "--repeats",
            "3", "--warmup", "0", "--backend", "torch", "--compare", "eager", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 130
    (json_path,) = tmp_path.glob("*.json")
    rows = json.loads(json_path.read_text())
    assert [r["samples"] for r in rows[:3]] == [3, 3, 3]
    assert sorted(r["samples"] for r in rows[3:]) == [1, 1, 2] and all(r["median_ms"] > 0 for r in rows[3:])
    assert all(r["error"] is None for r in rows)


def test_git_revision_falls_back_to_fastres_git_rev_outside_git(monkeypatch):
    """A copy of the tree without .git (gpu_check.sh on a lent GPU machine) records $FASTRES_GIT_REV."""
    monkeypatch.setattr(environment, "_run", lambda cmd, cwd=None: None)
    monkeypatch.setenv("FASTRES_GIT_REV", "abc1234")
    assert environment.git_revision() == "abc1234"
    monkeypatch.delenv("FASTRES_GIT_REV")
    assert environment.git_revision() is None
