"""The report: a backend × op × recipe matrix, each failure with its case, as Markdown and JSON."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from fp8dispatch.numerics import ERROR_BOUND

from . import cases as case_lists
from .cases import OPS
from .checks import FAILED, PASSED, UNSUPPORTED, Outcome
from .runner import Result, Run

# Matrix columns per op: granularities for quantize/dequantize, recipes for matmul.
COLUMNS = {
    "quantize": ("tensor", "row", "group", "block"),
    "dequantize": ("tensor", "row", "group", "block"),
    "matmul": ("block", "row", "tensor", "mixed"),
    "grouped_linear": ("block", "row"),
}
MARKS = {PASSED: "✓", FAILED: "✗", UNSUPPORTED: "–"}
REASONS_SHOWN = 20  # per backend in the Markdown; reasons that name shapes are many and alike


def matrix(run: Run) -> dict:
    """{backend: {op: {recipe: {passed, failed, unsupported}}}} over every result."""
    out: dict = {b: {op: {} for op in run.ops} for b in run.backends}
    for r in run.results:
        cell = out[r.backend][r.case.op].setdefault(r.case.recipe, {PASSED: 0, FAILED: 0, UNSUPPORTED: 0})
        cell[r.status] += 1
    return out


def totals(run: Run) -> Counter:
    return Counter(r.status for r in run.results)


def repro_command(result: Result, run: Run) -> str:
    size = "--quick" if run.quick else "--full"
    return (f"fp8dispatch conformance --backend {result.backend} --op {result.case.op} "
            f"--case {result.case.id} {size} --device {run.device}")


def _cell(counts: dict | None) -> str:
    if not counts or not any(counts.values()):
        return ""
    parts = []
    for status in (PASSED, FAILED, UNSUPPORTED):
        if counts[status]:
            text = f"{counts[status]} {MARKS[status]}"
            parts.append(f"**{text}**" if status == FAILED else text)
    return " · ".join(parts)


def matrix_markdown(run: Run) -> str:
    """One table per op: a row per backend, a column per recipe or granularity."""
    grid = matrix(run)
    blocks = []
    for op in run.ops:
        columns = [c for c in COLUMNS[op] if any(grid[b][op].get(c) for b in run.backends)]
        if not columns:  # a table needs a column besides the backend's
            blocks.append(f"**{op}**\n\nno checks ran")
            continue
        lines = [f"**{op}**", "", "| backend | " + " | ".join(columns) + " |",
                 "|---|" + "---|" * len(columns)]
        for backend in run.backends:
            cells = [_cell(grid[backend][op].get(c)) for c in columns]
            lines.append(f"| {backend} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def summary_line(run: Run) -> str:
    t = totals(run)
    size = "quick" if run.quick else "full"
    stopped = f", INTERRUPTED after {len(run.results)} of {run.planned}" if run.interrupted else ""
    return (f"{len(run.results)} checks ({size} size) on {run.device} in {run.seconds:.0f} s{stopped}: "
            f"{t[PASSED]} passed, {t[FAILED]} failed, {t[UNSUPPORTED]} unsupported")


def to_markdown(run: Run) -> str:
    env = run.environment
    lines = ["# fp8dispatch conformance report", "",
             f"fp8dispatch {env.get('fp8dispatch')} · torch {env.get('torch')} · triton {env.get('triton')} · "
             f"CUDA {env.get('cuda')} · {env.get('gpu', env.get('device'))} · {env.get('date')}", "",
             f"**{summary_line(run)}.**", "",
             "Every backend is held to the `reference` backend through the public API with `backend=<name>`. "
             "quantize: values and scales bit for bit (any NaN code matches a NaN). dequantize: bit for bit. "
             f"matmul: 1 − 2Σxy/Σ(x²+y²) < {ERROR_BOUND:g} against the fp32 product of the dequantized "
             "operands, bit for bit on exactly representable operands; grouped_linear the same per expert, "
             "and rows past masked_m exactly zero. Outputs are allocated over poisoned "
             "memory and run twice (identical bits), and inputs must come back unchanged. A case the "
             "backend's `why_not` declines must raise `Unsupported`. How to read this: docs/conformance.md.",
             "", "## Backends", "", "| backend | version | on this machine |", "|---|---|---|"]
    versions = env.get("backend_versions", {})
    for backend in run.backends:
        probe = run.probes.get(backend)
        lines.append(f"| {backend} | {versions.get(backend) or '-'} | "
                     f"{'available' if probe is None else 'unavailable: ' + _escape(probe)} |")
    lines += ["", "## Results", "", "✓ passed · ✗ failed · – unsupported (declined by the backend's `why_not` "
              "or probe, and raised `Unsupported` as it must)", "", matrix_markdown(run), ""]
    lines += ["## Failures", ""]
    if not run.failed:
        lines += ["None.", ""]
    for r in run.failed:
        lines += [f"### {r.backend} · {r.case.op} · {r.case.recipe}", "",
                  f"case `{r.case.id}` ({r.case.describe()})", "", "```", r.outcome.detail, "```", "",
                  f"reproduce: `{repro_command(r, run)}`", ""]
    lines += ["## Unsupported, by reason", ""]
    reasons = unsupported_reasons(run)
    if not reasons:
        lines += ["None.", ""]
    for backend, counted in reasons.items():
        lines.append(f"**{backend}**")
        lines.append("")
        common = counted.most_common()
        lines += [f"- {n} × {_escape(reason)}" for reason, n in common[:REASONS_SHOWN]]
        if len(common) > REASONS_SHOWN:
            lines.append(f"- … and {len(common) - REASONS_SHOWN} more distinct reasons "
                         f"({sum(n for _, n in common[REASONS_SHOWN:])} in all; every one is in the JSON)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def unsupported_reasons(run: Run) -> dict[str, Counter]:
    """Each backend's distinct reasons for declining, with how many cases each declined."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r in run.results:
        if r.status == UNSUPPORTED:
            for reason in r.outcome.detail.split("; "):
                out[r.backend][reason] += 1
    return dict(out)


def to_json(run: Run) -> dict:
    return {
        "summary": dict(totals(run)) | {"checks": len(run.results), "planned": run.planned,
                                        "interrupted": run.interrupted, "seconds": round(run.seconds, 2)},
        "size": "quick" if run.quick else "full",
        "environment": run.environment,
        "backends": {b: {"available": run.probes.get(b) is None, "probe": run.probes.get(b)} for b in run.backends},
        "ops": run.ops,
        "matrix": matrix(run),
        "results": [
            {"backend": r.backend, "op": r.case.op, "recipe": r.case.recipe, "case": r.case.id,
             "status": r.status, "detail": r.outcome.detail, "seconds": round(r.seconds, 4),
             **({"reproduce": repro_command(r, run)} if r.status == FAILED else {})}
            for r in run.results
        ],
    }


def write(run: Run, path: str | Path) -> tuple[Path, Path]:
    """Write the Markdown report and the JSON beside it (same name, the other suffix)."""
    path = Path(path)
    md, js = (path.with_suffix(".md"), path) if path.suffix == ".json" else (path, path.with_suffix(".json"))
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(to_markdown(run), encoding="utf-8")
    js.write_text(json.dumps(to_json(run), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return md, js


def load(path: str | Path) -> Run:
    """A run read back from its JSON report (or the report beside a Markdown `path`)."""
    path = Path(path)
    js = path if path.suffix == ".json" else path.with_suffix(".json")
    data = json.loads(js.read_text(encoding="utf-8"))
    known = {c.id: c for quick in (True, False) for c in case_lists.all_cases(quick)}
    results = [Result(r["backend"], known[r["case"]], Outcome(r["status"], r["detail"]), r["seconds"])
               for r in data["results"] if r["case"] in known]
    run = Run(device=data["environment"].get("device", ""), quick=data["size"] == "quick",
              backends=list(data["backends"]), ops=list(data["ops"]), environment=data["environment"],
              probes={b: v["probe"] for b, v in data["backends"].items()}, results=results,
              seconds=data["summary"]["seconds"])
    run.planned = len(results) + data["summary"]["planned"] - data["summary"]["checks"]
    return run


def merge(run: Run, path: str | Path) -> Run:
    """`run` plus the results of other backends in an earlier JSON report at `path` (or beside it).

    For machines where one command cannot run every backend in its time limit: run them one or a
    few at a time with `--merge` (or side by side, each to its own report, then `--from`), and the
    last report holds them all. A backend checked again on an op replaces its earlier results for
    that op; its other ops' results stay.
    """
    path = Path(path)
    js = path if path.suffix == ".json" else path.with_suffix(".json")
    if not js.exists():
        return run
    return combine(load(js), run)


def combine(old: Run, run: Run) -> Run:
    """`run` plus the results from `old` of every (backend, op) that `run` did not check."""
    kept = [r for r in old.results if r.backend not in run.backends or r.case.op not in run.ops]
    names = list(dict.fromkeys([*old.backends, *run.backends]))
    merged = Run(device=run.device, quick=run.quick and old.quick, backends=names,
                 ops=[op for op in OPS if op in {*old.ops, *run.ops}], environment=run.environment,
                 probes=old.probes | run.probes, results=kept + run.results,
                 seconds=run.seconds + sum(r.seconds for r in kept))
    # Checks still to run: run's, and old's too when run replaced none of old's backends (old does
    # not say whose its unrun checks were).
    old_left = 0 if set(old.backends) & set(run.backends) else old.planned - len(old.results)
    merged.planned = len(merged.results) + run.planned - len(run.results) + old_left
    return merged


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["COLUMNS", "OPS", "combine", "load", "matrix", "matrix_markdown", "merge", "repro_command", "summary_line", "to_json",
           "to_markdown", "unsupported_reasons", "write"]
