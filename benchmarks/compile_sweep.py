"""Compile-report sweep: the ten torchvision models x dtypes x archs x batches, for this Triton.

    env -u TRITON_INTERPRET nice -n 10 .venv/bin/python benchmarks/compile_sweep.py \
        --arch sm_80 --out benchmarks/compile_sweep.jsonl
    .venv/bin/python benchmarks/compile_sweep.py --summary benchmarks/compile_sweep.jsonl

Each (model, dtype, arch, batch) is `fastres compile-report`'s work (collect_specs + compile_all,
image 224): one JSON line per entry, appended as soon as it is done, keyed with the Triton version, so
a stopped sweep resumes where it left off and one file holds the runs of several Triton versions (run
the script with each version's interpreter). The summary table reads the file, never recompiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "int8": "int8", "fp8": "float8_e4m3fn"}
FP8_MIN_ARCH = 89  # e4m3 tensor cores: sm_80 entries of fp8 are not compiled


def ten_models() -> list[str]:
    from fastres.specs import MODEL_SPECS

    return [name for name, spec in MODEL_SPECS.items() if not spec.deep_stem]  # timm's -D ones add it


def _key(row: dict) -> tuple:
    return row["triton"], row["model"], row["dtype"], row["arch"], row["batch"]


def load(path: Path) -> dict[tuple, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[_key(row)] = row  # a rerun's line replaces an earlier one
    return rows


def _git_rev() -> str:
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def sweep_one(model: str, dtype: str, arch: str, batch: int, image_size: int) -> dict:
    import torch

    from fastres.tools import compile_report

    arch_num = compile_report.parse_arch(arch)
    specs, launches = compile_report.collect_specs(
        model, getattr(torch, DTYPES[dtype]), batch, image_size, image_size, arch_num
    )
    start = time.perf_counter()
    reports = compile_report.compile_all(specs, arch_num, progress=False)
    bad = [
        {
            "kernel": r.name,
            "config": r.config,
            "registers": r.registers,
            "spill_bytes": r.spill_bytes,
            "error": r.error,
        }
        for r in reports
        if not r.compiled_ok or r.spills
    ]
    return {
        "kernels": len(reports),
        "launches": launches,
        "failed": sum(not r.compiled_ok for r in reports),
        "spilling": sum(r.compiled_ok and r.spills for r in reports),
        "max_registers": max((r.registers or 0) for r in reports),
        "compile_s": round(time.perf_counter() - start, 1),
        "bad": bad,
    }


def run(args) -> int:
    import triton

    path = Path(args.out)
    done = load(path)
    todo = [
        (m, d, a, b)
        for a in args.arch
        for d in args.dtype
        for b in args.batch
        for m in args.model or ten_models()
        if (triton.__version__, m, d, a, b) not in done
        and not (d == "fp8" and int(a.removeprefix("sm_")) < FP8_MIN_ARCH)
    ]
    print(f"triton {triton.__version__}: {len(todo)} entries to compile, appending to {path}", flush=True)
    rev = _git_rev()
    for i, (model, dtype, arch, batch) in enumerate(todo, 1):
        row = {"triton": triton.__version__, "model": model, "dtype": dtype, "arch": arch, "batch": batch}
        row |= sweep_one(model, dtype, arch, batch, args.image_size)
        row |= {"image_size": args.image_size, "git_rev": rev, "date_utc": time.strftime("%Y-%m-%d %H:%M")}
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"[{i}/{len(todo)}] {model} {dtype} {arch} b{batch}: {row['kernels']} kernels, "
            f"{row['failed']} failed, {row['spilling']} spilling ({row['compile_s']} s)",
            flush=True,
        )
        for b in row["bad"]:
            print(f"    {b}", flush=True)
    return summary(path)


def summary(path: Path) -> int:
    """One line per (Triton, arch, dtype): entries, kernels, failed, spilling, the worst spill."""
    groups: dict[tuple, list[dict]] = {}
    for row in load(path).values():
        groups.setdefault((row["triton"], row["arch"], row["dtype"]), []).append(row)
    header = f"{'triton':8} {'arch':6} {'dtype':5} {'entries':>7} {'kernels':>7} {'failed':>6}"
    header += f" {'spilling':>8}  worst"
    print(header)
    print("-" * len(header))
    any_bad = False
    for (tv, arch, dtype), rows in sorted(groups.items()):
        bad = [(b, r) for r in rows for b in r["bad"]]
        spills = [(b, r) for b, r in bad if b["spill_bytes"]]
        worst = "-"
        if spills:
            b, r = max(spills, key=lambda x: x[0]["spill_bytes"])
            worst = f"{b['spill_bytes']} B: {r['model']} b{r['batch']} {b['kernel']} {b['config']}"
        elif bad:
            b, r = bad[0]
            worst = f"FAILED: {r['model']} b{r['batch']} {b['kernel']} {b['config']}"
        any_bad |= bool(bad)
        print(
            f"{tv:8} {arch:6} {dtype:5} {len(rows):7} {sum(r['kernels'] for r in rows):7} "
            f"{sum(r['failed'] for r in rows):6} {sum(r['spilling'] for r in rows):8}  {worst}"
        )
    return 1 if any_bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="compile_sweep.jsonl", help="JSONL file appended to (and resumed from)")
    p.add_argument("--summary", metavar="JSONL", help="only print the summary table of this file")
    p.add_argument("--model", nargs="+", help="default: the ten torchvision models")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 256])
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)
    if args.summary:
        return summary(Path(args.summary))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # kernels must compile, not interpret
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, __file__, *argv], env=env).returncode
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
