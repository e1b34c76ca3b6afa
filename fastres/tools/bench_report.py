"""Output of `fastres bench`: the stdout table, CSV and JSON files, and the optional PNG plot."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# A row whose 90th percentile is this far above its median was disturbed (other processes, clocks,
# thermal throttling): its median may be far from a quiet run's, so the table says so.
NOISY_SPREAD = 1.25
# A 1-minute load average above this share of the cores means other work competed for the CPU.
BUSY_LOAD_PER_CORE = 0.5


def _spread(r: dict[str, Any]) -> float | None:
    if not r.get("median_ms") or r.get("p90_ms") is None:
        return None
    return r["p90_ms"] / r["median_ms"]


def disturbance_note(rows: list[dict[str, Any]], cores: int | None = None) -> str | None:
    """A warning for the foot of the table when the spread or the machine's load says the run was noisy."""
    noisy = [r for r in rows if (_spread(r) or 0) > NOISY_SPREAD]
    cores = cores or os.cpu_count() or 1
    loads = [r["load_avg_1m"] for r in rows if r.get("load_avg_1m") is not None]
    busy = bool(loads) and rows[0].get("device") == "cpu" and max(loads) > BUSY_LOAD_PER_CORE * cores
    if not noisy and not busy:
        return None
    parts = []
    if noisy:
        parts.append(f"{len(noisy)} row(s) marked 'noisy' have p90 > {NOISY_SPREAD:g}x their median")
    if busy:
        parts.append(f"the 1-minute load average reached {max(loads):.1f} on {cores} cores")
    reasons = "; ".join(parts)
    return f"WARNING: this run was disturbed ({reasons}): rerun on a quiet machine before quoting it"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("batch", "candidate", "median ms", "p90 ms", "img/s", "fastres x", "first s", "peak MB", "note")
    body = []
    for r in rows:
        body.append(
            (
                str(r["batch"]),
                r["candidate"],
                _fmt(r["median_ms"], ".3f"),
                _fmt(r["p90_ms"], ".3f"),
                _fmt(r["throughput_img_s"], ",.1f"),
                _fmt(r["fastres_speedup"], ".2f"),
                _fmt(r["first_result_s"], ".2f"),
                _fmt(r["peak_mem_mb"], ",.0f"),
                r["error"] or ("noisy" if (_spread(r) or 0) > NOISY_SPREAD else ""),
            )
        )
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
    line = lambda row: "  ".join(
        [c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row[:-1], widths, strict=True))]
        + [row[-1]]
    ).rstrip()
    out = [line(header), line(tuple("-" * w for w in widths) + ("",))]
    for i, row in enumerate(body):
        if i and rows[i]["batch"] != rows[i - 1]["batch"]:
            out.append("")
        out.append(line(row))
    note = disturbance_note(rows)
    return "\n".join(out + ([note] if note else []))


def describe_run(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    fast = next(x for x in rows if x["candidate"] == "fastres")
    cpu = f"; ISA {r['cpu_isa'] or 'unknown'}" if r.get("cpu_isa") is not None else ""
    openvino = f", openvino {r['openvino']}" if r.get("openvino") else ""
    return (
        f"{r['model']} ({r['weights']}) {r['dtype']} on {r['device']} [{r['device_name']}{cpu}], "
        f"backend {fast['backend']}, image {r['image_size']}px; "
        f"torch {r['torch']}, triton {r['triton']}{openvino}, "
        f"fastres {r['fastres']} ({r['git_rev'] or 'no git'}), {r['date_utc']}\n"
        f"load to first result: cold {_fmt(fast['cold_load_s'], '.2f')} s, "
        f"warm {_fmt(fast['warm_load_s'], '.2f')} s; "
        f"'fastres x' = candidate median / fastres median; memory: {fast['mem_method']}"
        + (
            "\nint8: eager and torch.compile run float32 (PyTorch has no int8 conv); openvino is NNCF int8"
            if r["dtype"] == "int8"
            else "\nfp8: eager and torch.compile run float32 (PyTorch has no fp8 conv)"
            if r["dtype"] in ("fp8", "float8_e4m3fn")
            else ""
        )
    )


def write_results(
    rows: list[dict[str, Any]], out_dir: str | os.PathLike, stem: str, plot: bool = True
) -> tuple[list[Path], str | None]:
    """CSV, JSON and (matplotlib permitting) a PNG into out_dir; returns the paths and a note if no plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    paths, note = [csv_path, json_path], None
    if plot:
        png, note = plot_results(rows, out / f"{stem}.png")
        if png is not None:
            paths.append(png)
    return paths, note


def plot_results(rows: list[dict[str, Any]], path: Path) -> tuple[Path | None, str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "no plot: matplotlib is not installed (pip install fastres[plot] gives the plot)"
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["candidate"] for r in rows):
        pts = [
            (r["batch"], r["median_ms"], r["throughput_img_s"])
            for r in rows
            if r["candidate"] == name and r["median_ms"] is not None
        ]
        if pts:
            b, ms, ips = zip(*pts, strict=True)
            lat.plot(b, ms, marker="o", label=name)
            thr.plot(b, ips, marker="o", label=name)
    batches = sorted({r["batch"] for r in rows})
    for ax, label in ((lat, "median latency (ms)"), (thr, "throughput (img/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    lat.legend(fontsize=8)
    r = rows[0]
    fig.suptitle(f"{r['model']} {r['dtype']} on {r['device_name']} ({r['date_utc']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None


def result_stem(model: str, device: str, dtype: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"bench_{model}_{device.replace(':', '')}_{dtype}_{stamp}"
