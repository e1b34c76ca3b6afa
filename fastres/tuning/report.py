"""`fastres tune`'s printout: per layer the rule config against the chosen tactic, then per network."""

from __future__ import annotations

from collections import Counter

from .tuner import TuneReport

INTERPRETER_NOTE = (
    "NOTE: TRITON_INTERPRET=1: the kernels ran in Triton's interpreter on the CPU. The times below "
    "measure the interpreter and mean nothing for a GPU; what this run shows is that every step works "
    "(candidates, parity gate, timing, budget, cache write and read, fallback)."
)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _drop_kind(reason: str) -> str:
    for word in ("parity", "compile", "spills", "shared memory", "cap", "budget", "failed to run"):
        if word in reason:
            return word
    return "other"


def format_layer_line(r) -> str:
    """One layer's result as it is chosen (a log line: a run stopped later keeps it)."""
    chosen = "(rule)" if r.chosen == r.rule else r.chosen.label
    return (
        f"tuned b{r.batch} {r.ops[0]} (+{len(r.ops) - 1}): rule {r.rule.label} {_ms(r.rule_s)} ms, "
        f"chosen {chosen} {_ms(r.chosen_s)} ms; {r.reason}"
    )


def format_report(report: TuneReport) -> str:
    out = [INTERPRETER_NOTE, ""] if report.interpreted else []
    header = ("layer", "ops", "rule config", "rule ms", "chosen", "chosen ms", "speedup", "why")
    for net in report.networks:
        rows = []
        for r in (r for r in report.layers if r.batch == net.batch):
            speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
            chosen = "(rule)" if r.chosen == r.rule else r.chosen.label
            rows.append(
                (
                    r.ops[0],
                    str(len(r.ops)),
                    r.rule.label,
                    _ms(r.rule_s),
                    chosen,
                    _ms(r.chosen_s),
                    speedup,
                    r.reason,
                )
            )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        line = lambda row, widths=widths: "  ".join(
            c.ljust(w) if i in (0, 2, 4, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()
        out += [f"batch {net.batch}:", line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]
        whole = "-"
        if net.rules_s and net.tuned_s:
            whole = f"{net.rules_s / net.tuned_s:.2f}x"
        verdict = "choices kept" if net.kept else net.note
        out += [
            f"whole network, batch {net.batch}: rules {_ms(net.rules_s)} ms, tuned {_ms(net.tuned_s)} ms, "
            f"speedup {whole} ({verdict})",
            "",
        ]
    dropped = Counter(_drop_kind(why) for r in report.layers for _, why in r.dropped)
    if dropped:
        out.append("tactics dropped: " + ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items())))
    parity = [(r.ops[0], label, why) for r in report.layers for label, why in r.dropped if "parity" in why]
    out += [f"  discarded by the parity gate: {op} {label}: {why}" for op, label, why in parity]
    spent = sum(not r.tuned for r in report.layers)
    search = report.elapsed_s - report.network_s
    budget = (
        f"{search:.1f} s of the {report.budget_s:g} s budget, whole-network checks {report.network_s:.1f} s"
    )
    out.append(
        f"layer search took {budget}"
        + (f"; budget spent, {spent} layer contexts kept the rule config" if spent else "")
    )
    return "\n".join(out)
