"""`fp8dispatch support-matrix`: the backend × op × recipe × format matrix, generated from `why_not`.

torch and the library are imported where the matrix is generated, so `--help` answers at once.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from fp8dispatch import cli
from fp8dispatch.blocks import RECIPES, recipe_blocks

DEFAULT_PATH = Path("docs/support-matrix.md")

# Where to ask: (heading, device, capability). The probe is not consulted (each built-in `why_not`
# is asked without a probe result, so it describes a complete install), so a CPU machine can
# describe a GPU: the matrix states what each backend declares, not what this machine has.
TARGETS = (
    ("sm90: H100, H200", "cuda:0", (9, 0)),
    ("sm100: B200, GB200", "cuda:0", (10, 0)),
    ("sm89: L4, L40S, RTX 4090", "cuda:0", (8, 9)),
    ("cpu", "cpu", None),
)
# Representative problems: DeepSeek-V3-sized and aligned, then small with tails in every dimension.
M, N, K = 4096, 7168, 2048
TAIL_M, TAIL_N, TAIL_K = 1, 200, 200
GRANULARITY_BLOCKS = (("tensor", (M, K)), ("row", (1, K)), ("group", (1, 128)), ("block", (128, 128)))


def add_arguments(parser) -> None:
    parser.add_argument("--output", default=str(DEFAULT_PATH), metavar="PATH",
                        help=f"where to write the matrix (default: {DEFAULT_PATH})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if PATH differs from what would be generated")


def run(args) -> int:
    text = generate()
    path = Path(args.output)
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current == text:
            print(f"{path} is current")
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(path), "generated", lineterm="", n=1)
        print("\n".join(list(diff)[:40]), file=sys.stderr)
        print(f"{path} is stale: regenerate it with `fp8dispatch support-matrix --output {path}`", file=sys.stderr)
        return 1
    if not path.parent.is_dir():  # write only where told: never create folders (docs/ outside the repository)
        raise cli.UsageError("--output", f"{path}: the folder {path.parent} does not exist")
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


def sections(device: str, capability) -> list[tuple[str, list[str], dict]]:
    """(title, columns, {column: {fp8 dtype: problem}}) per op for one target."""
    import torch

    from fp8dispatch.formats import FORMATS
    from fp8dispatch.grouped import GROUPED_RECIPES, GroupedLinearProblem, grouped_block
    from fp8dispatch.problem import dequantize_problem, matmul_problem, quantize_problem

    device = torch.device(device)
    quantize = {g: {f: quantize_problem(device, (M, K), b, fp8_dtype=f, capability=capability) for f in FORMATS}
                for g, b in GRANULARITY_BLOCKS}
    dequantize = {g: {f: dequantize_problem(device, (M, K), b, fp8_dtype=f, capability=capability) for f in FORMATS}
                  for g, b in GRANULARITY_BLOCKS}

    def matmul(m, k, n):
        return {r: {f: matmul_problem(device, m, n, k, *recipe_blocks(r, m, k, n), a_dtype=f, b_dtype=f,
                                      capability=capability) for f in FORMATS} for r in RECIPES}

    def grouped(layout, groups, rows, n, k):
        return {r: {f: GroupedLinearProblem(device, capability, layout, r, f, f, groups, rows, n, k,
                                            (1, 128) if r == "block" else (1, k), grouped_block(r, n, k),
                                            torch.int64, True, True, torch.bfloat16, None) for f in FORMATS}
                for r in GROUPED_RECIPES}

    return [
        (f"quantize: bf16 [{M}, {K}] to FP8", [g for g, _ in GRANULARITY_BLOCKS], quantize),
        (f"dequantize: FP8 [{M}, {K}] to bf16", [g for g, _ in GRANULARITY_BLOCKS], dequantize),
        (f"matmul: [{M}, {K}] @ [{K}, {N}] (b the transpose of a [N, K] weight), bf16 out", list(RECIPES),
         matmul(M, K, N)),
        (f"matmul with tails: [{TAIL_M}, {TAIL_K}] @ [{TAIL_K}, {TAIL_N}], bf16 out", list(RECIPES),
         matmul(TAIL_M, TAIL_K, TAIL_N)),
        (f"grouped_linear, contiguous: 8 experts, x [{M}, {K}] sorted by expert, w [8, {N}, {K}], bf16 out",
         list(GROUPED_RECIPES), grouped("contiguous", 8, M, N, K)),
        (f"grouped_linear, masked: x [256, 64, {K}], w [256, {N}, {K}], bf16 out", list(GROUPED_RECIPES),
         grouped("masked", 256, 64, N, K)),
    ]


def declared(backend, problem) -> list[str]:
    """The backend's own reasons (its why_not, and whether it implements the op at all)."""
    if backend.function(problem.op) is None:
        return [f"does not implement {problem.op}"]
    try:
        return list(backend.why_not(problem.op, problem))
    except Exception as e:  # noqa: BLE001 - the matrix shows it rather than dying
        return [f"why_not raised {type(e).__name__}: {e}"]


def generate() -> str:
    from fp8dispatch import registry

    # Built-in backends only: the committed file must not depend on what else a process registered.
    backends = [b for b in registry.all_backends() if b.name in registry.BUILTIN_MODULES]
    lines = [
        "# Support matrix",
        "",
        "Generated by `fp8dispatch support-matrix` from each built-in backend's `why_not` on representative "
        "problems; do not edit (CI runs `fp8dispatch support-matrix --check`). A cell lists the FP8 formats the "
        "backend accepts for that op and recipe; a number points to the reasons it gives for the others. "
        "Probes are not consulted: this is what a backend declares for a machine of that kind, not what the "
        "machine that generated the file has (see `fp8dispatch info` for that, and `fp8dispatch conformance` "
        "for whether the answers are right).",
        "",
        f"Backends: {', '.join(f'`{b.name}`' for b in backends)}. Formats: e4m3fn, e5m2, e4m3fnuz (MI300), e5m2fnuz.",
    ]
    for heading, device, capability in TARGETS:
        lines += ["", f"## {heading}"]
        for title, columns, problems in sections(device, capability):
            notes: dict[str, int] = {}
            lines += ["", f"**{title}**", "", "| backend | " + " | ".join(columns) + " |",
                      "|---|" + "---|" * len(columns)]
            for backend in backends:
                cells = [_cell(backend, problems[c], notes) for c in columns]
                lines.append(f"| {backend.name} | " + " | ".join(cells) + " |")
            if notes:
                lines.append("")
                lines += [f"{n}. {_escape(reason)}" for reason, n in notes.items()]
    return "\n".join(lines) + "\n"


def _cell(backend, by_format: dict, notes: dict[str, int]) -> str:
    from fp8dispatch.formats import FORMATS

    accepted, refs = [], []
    for fp8, problem in by_format.items():
        reasons = declared(backend, problem)
        if not reasons:
            accepted.append(FORMATS[fp8].name)
            continue
        for reason in reasons:
            number = notes.setdefault(reason, len(notes) + 1)
            if number not in refs:
                refs.append(number)
    marks = f" ({', '.join(map(str, refs))})" if refs else ""
    return (" ".join(accepted) if accepted else "—") + marks


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
