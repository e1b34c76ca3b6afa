"""benchmarks/gpu_check.sh without a GPU: control flow, stage list, deadline, what comes back in $OUT."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
GPU_STAGES = (
    "smoke", "pytest-gpu", "kernels-8bit", "bench-resnet50", "bench-resnet18", "int8-resnet18",
    "fp8-resnet18", "layers-resnet50", "tune-resnet50", "compile-resnet50",
)  # fmt: skip
STDOUT_RETURNED = 12_000  # characters of stdout+stderr the device machine returns
MAX_OUT_FILES = 8  # files it returns from $OUT, at most 2 folder levels deep
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env(tmp_path, **extra) -> dict:
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # python3 is this interpreter
    return {**os.environ, "PATH": path, "OUT": str(tmp_path / "out"), "GPU_CHECK_DIR": str(tmp_path / "work"),
            **extra}  # fmt: skip


def _summary_rows(text: str) -> dict[str, str]:
    """{stage: status} from the summary's table (header line `stage status ...` to the first blank line)."""
    table = text.split("\nstage ", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return {line[:18].strip(): line[19:35].strip() for line in table}  # printf '%-18s %-16s ...'


def test_dry_run_skips_gpu_stages_and_returns_a_tarball_and_summary(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=_env(tmp_path), timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.split("=== summary")[1]
    rows = _summary_rows(summary)
    assert list(rows) == ["install", "versions", *GPU_STAGES], summary
    assert all(rows[stage] == "skip" for stage in GPU_STAGES), summary
    assert rows["install"] == "ok" and rows["versions"] == "ok", summary
    assert "git_rev recorded in result rows:" in summary and "self-check: no SelfCheckWarning" in summary
    # The summary is last and fits, with room, in what comes back of stdout.
    assert len(summary) < STDOUT_RETURNED // 2 and done.stdout.rstrip().endswith(summary.rstrip())
    # Only what the device returns: a few files, named plainly, not deep; the rest inside the tarball.
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu-check.tar.gz", "summary.txt"], files
    assert len(files) <= MAX_OUT_FILES
    assert all(len(p.relative_to(out).parts) <= 3 and SAFE_NAME.match(p.name) for p in files)
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
        assert {f"work/{stage}.log" for stage in ("install", "versions", *GPU_STAGES)} <= set(names), names
        versions = tar.extractfile("work/versions.log").read().decode()
    assert "torch" in versions and "git_rev recorded in result rows:" in versions
    assert (out / "summary.txt").read_text().strip() == summary.split("\n", 1)[1].strip()
    # What the GPU stages would run: no torch.compile in the batch sweep; one quick mode at batch 1 last.
    log = lambda stage: (tmp_path / "work" / f"{stage}.log").read_text()
    assert "compile" not in log("bench-resnet50").split("would run:")[1]
    assert "--batch 1 --dtype fp16 --compare eager,compile --compile-modes reduce-overhead" in log(
        "compile-resnet50"
    )


def test_past_the_deadline_every_stage_is_skipped_for_lack_of_time(tmp_path):
    env = _env(tmp_path, GPU_CHECK_DEADLINE_S="0")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--only", "smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _summary_rows(done.stdout.split("=== summary")[1])
    assert rows["install"] == rows["smoke"] == "skip(no time)" and rows["pytest-gpu"] == "-", rows


_TIMEOUT_STAGE = r"""
source "$1"
init_work
stage_cmd() { echo "$Q_PY -c 'import time; print(\"started\"); time.sleep(60)'"; }
MIN_STAGE_S=1
run_stage smoke 2 0
"""


def test_a_stage_over_its_limit_is_interrupted_and_what_it_printed_comes_back(tmp_path):
    done = subprocess.run(
        ["bash", "-c", _TIMEOUT_STAGE, "test", str(SCRIPT)], capture_output=True, text=True,
        env=_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert "--> smoke: TIMEOUT (2 s)" in done.stdout, done.stdout + done.stderr
    log = (tmp_path / "work" / "smoke.log").read_text()
    assert "started" in log and "KeyboardInterrupt" in log  # SIGINT first: Python says where it was
    assert re.search(r"^smoke +TIMEOUT +2 +2 +2$", (tmp_path / "out" / "summary.txt").read_text(), re.M)
    with tarfile.open(tmp_path / "out" / "gpu-check.tar.gz") as tar:
        assert "started" in tar.extractfile("work/smoke.log").read().decode()


_LEFTOVER_STAGE = r"""
source "$1"
init_work
stage_cmd() { echo "$Q_PY -c 'import time; time.sleep(300)' leftover-$$ & wait"; }
MIN_STAGE_S=1 GRACE=1
run_stage smoke 2 0
pgrep -f "leftover-$$" || echo "no leftover"
"""


def test_what_a_stage_leaves_running_is_killed_at_its_limit(tmp_path):
    """A background job of the stage's shell ignores SIGINT: it must not run on into later stages."""
    done = subprocess.run(
        ["bash", "-c", _LEFTOVER_STAGE, "test", str(SCRIPT)], capture_output=True, text=True,
        env=_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert "--> smoke: TIMEOUT" in done.stdout and "no leftover" in done.stdout, done.stdout + done.stderr


def test_a_run_where_torch_sees_no_gpu_fails_loudly(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), "--only", "smoke"], capture_output=True, text=True,
        env=_env(tmp_path, CUDA_VISIBLE_DEVICES=""), timeout=240,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "NOTHING WAS MEASURED ON A GPU" in done.stdout.split("=== summary")[1]


def test_unknown_argument_or_stage_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown argument" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT), "--only", "smok"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown stage smok" in done.stderr
