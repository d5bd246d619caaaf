"""`fp8dispatch bench --model`: DeepSeek-V3-shaped blocks in FP8 beside the same blocks in bf16.

Two blocks, built in bf16 and converted by `fp8dispatch.nn.convert` (block recipe, `auto`):
the dense MLP (7168 → 18432 → 7168, `down(silu(gate(x)) * up(x))`) and the attention projections
(q_a 1536×7168 → q_b 24576×1536; kv_a 576×7168 → kv_b 32768×512 on the first 512 columns;
o 7168×16384). Each runs at M tokens in three modes: eager, `torch.compile` and
`torch.compile(mode="reduce-overhead")` (CUDA graphs), the bf16 block the same way in the same
run. Per forward: wall time (back-to-back calls, the GPU synchronized once at the end) and host
time (until the Python call returns). Then the host time of single calls: `fd.quantize`,
`fd.matmul`, `fd.linear` against `F.linear` in bf16, `torch._scaled_mm` and an empty Triton launch.

Writes `model.json`, `model.md` and (with matplotlib) `model.png` into `--out`
(default `docs/results/<gpu>/`).
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

import fp8dispatch as fd
from fp8dispatch.nn import convert

M_VALUES = (1, 16, 128, 1024, 4096)
MODES = ("eager", "compile", "reduce-overhead")
TARGET_S = 0.1  # timed seconds per measurement


class Mlp(nn.Module):
    """DeepSeek-V3's dense MLP."""

    def __init__(self, dim: int = 7168, hidden: int = 18432):
        super().__init__()
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))

    @staticmethod
    def inputs(m: int, device) -> tuple:
        return (torch.randn(m, 7168, device=device, dtype=torch.bfloat16),)


class AttentionProjections(nn.Module):
    """DeepSeek-V3's MLA projections (norms and attention itself left out): x → q, x → kv, h → o."""

    def __init__(self):
        super().__init__()
        self.q_a, self.q_b = nn.Linear(7168, 1536, bias=False), nn.Linear(1536, 24576, bias=False)
        self.kv_a, self.kv_b = nn.Linear(7168, 576, bias=False), nn.Linear(512, 32768, bias=False)
        self.o = nn.Linear(16384, 7168, bias=False)

    def forward(self, x, h):
        return self.q_b(self.q_a(x)), self.kv_b(self.kv_a(x)[:, :512]), self.o(h)

    @staticmethod
    def inputs(m: int, device) -> tuple:
        return (torch.randn(m, 7168, device=device, dtype=torch.bfloat16),
                torch.randn(m, 16384, device=device, dtype=torch.bfloat16))


BLOCKS = {"mlp": Mlp, "attention": AttentionProjections}


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100': the folder results are filed in."""
    words = [w for w in name.lower().replace("-", " ").split() if w not in ("nvidia", "geforce", "tesla")]
    return words[0] if words else "gpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, inputs, reps: int | None = None) -> tuple[float, float, int]:
    """(wall µs, host µs) per call of `fn(*inputs)`, after warm-up; `reps` chosen to take ~TARGET_S."""
    for _ in range(3):
        fn(*inputs)
    _sync()
    if reps is None:
        start = time.perf_counter()
        fn(*inputs)
        _sync()
        reps = int(min(max(TARGET_S / max(time.perf_counter() - start, 1e-6), 5), 300))
    start = time.perf_counter()
    for _ in range(reps):
        fn(*inputs)
    issued = time.perf_counter()
    _sync()
    end = time.perf_counter()
    return (end - start) / reps * 1e6, (issued - start) / reps * 1e6, reps


def _runner(model, mode: str):
    if mode == "eager":
        return model
    compiled = torch.compile(model, fullgraph=True, mode=None if mode == "compile" else mode)
    if mode != "reduce-overhead":
        return compiled

    def step(*inputs):
        torch.compiler.cudagraph_mark_step_begin()  # replays may reuse the last outputs' memory
        return compiled(*inputs)
    return step


def _same(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(torch.equal(x, y) for x, y in zip(a, b))


def model_rows(block: str, ms, modes, device, log, deadline: float = float("inf")) -> list[dict]:
    torch.manual_seed(0)
    bf16 = BLOCKS[block]().to(device, torch.bfloat16).eval()
    fp8 = copy.deepcopy(bf16)
    report = convert(fp8)
    log(f"{block}: {len(report.converted)} layers converted, "
        f"{report.bytes_before / 2**20:.0f} MiB -> {report.bytes_after / 2**20:.0f} MiB of weights")
    rows = []
    for mode in modes:
        runs = {"bf16": _runner(bf16, mode), "fp8": _runner(fp8, mode)}
        for m in ms:
            inputs = BLOCKS[block].inputs(m, device)
            row = {"block": block, "mode": mode, "m": m}
            if time.perf_counter() > deadline:
                row["error"] = "not measured: past --budget"
                rows.append(row)
                continue
            try:
                with torch.no_grad():
                    for name, fn in runs.items():
                        start = time.perf_counter()
                        fn(*inputs)
                        _sync()
                        row[f"{name}_first_s"] = time.perf_counter() - start  # compiles, tunes
                        row[f"{name}_us"], row[f"{name}_host_us"], row[f"{name}_reps"] = _timed(fn, inputs)
                    if mode != "eager":  # compiled against eager, bit for bit (bf16 too: Inductor's fusions)
                        row["fp8_equals_eager"] = _same(runs["fp8"](*inputs), fp8(*inputs))
                        row["bf16_equals_eager"] = _same(runs["bf16"](*inputs), bf16(*inputs))
                row["speedup"] = row["bf16_us"] / row["fp8_us"]
            except Exception as e:  # noqa: BLE001 - one failed cell is reported, the run goes on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log(_line(row))
            rows.append(row)
        torch._dynamo.reset()
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"  {r['block']:<9} {r['mode']:<15} M={r['m']:<5} ERROR {r['error']}"
    eq = "" if "fp8_equals_eager" not in r else (
        f"bits vs eager: fp8 {'equal' if r['fp8_equals_eager'] else 'differ'}, "
        f"bf16 {'equal' if r['bf16_equals_eager'] else 'differ'}")
    return (f"  {r['block']:<9} {r['mode']:<15} M={r['m']:<5} bf16 {r['bf16_us']:9.1f} µs  fp8 {r['fp8_us']:9.1f} µs"
            f"  {r['speedup']:5.2f}x   host bf16 {r['bf16_host_us']:7.1f} fp8 {r['fp8_host_us']:7.1f} µs  {eq}")


@triton.jit
def _empty(x_ptr, N: tl.constexpr):
    """A kernel that does nothing: the host cost of a launch through Triton's own path."""
    pass


def host_rows(device, m: int = 1, n: int = 18432, k: int = 7168) -> list[dict]:
    """Host time per call (no synchronization between calls) of single ops at one shape."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
    wq, xq = fd.quantize(w, "block"), fd.quantize(x, "group")
    wt = wq.t()
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
    calls = {
        "F.linear (bf16)": lambda: F.linear(x, w),
        "empty Triton launch": lambda: _empty[(1,)](x, N=1),
        "torch._scaled_mm (rowwise)": lambda: torch._scaled_mm(x8, w8.t(), sa, sb, out_dtype=torch.bfloat16),
        'fd.quantize(x, "group")': lambda: fd.quantize(x, "group"),
        "fd.matmul(xq, wq.t())": lambda: fd.matmul(xq, wt),
        "fd.linear(x, wq)": lambda: fd.linear(x, wq),
    }
    rows = []
    for name, fn in calls.items():
        try:
            best = min(_timed(fn, (), reps=200)[1] for _ in range(5))
        except Exception as e:  # noqa: BLE001 - a library that cannot run here leaves its row out
            print(f"  host {name}: {type(e).__name__}: {e}")
            continue
        rows.append({"call": name, "m": m, "n": n, "k": k, "host_us": best})
    base = {r["call"]: r["host_us"] for r in rows}
    for r in rows:
        r["vs_f_linear"] = r["host_us"] / base.get("F.linear (bf16)", float("nan"))
        r["vs_empty_launch"] = r["host_us"] / base.get("empty Triton launch", float("nan"))
    return rows


def markdown(env: dict, rows: list[dict], host: list[dict], command: str) -> str:
    lines = [f"# DeepSeek-V3 blocks, FP8 (fp8dispatch, `auto`) against bf16: {env['gpu']}", "",
             f"`{command}` — torch {env['torch']}, triton {env['triton']}, Python {env['python']}.", "",
             "Wall time per forward (calls back to back, synchronized at the end), speedup = bf16 / FP8 "
             "(above 1: FP8 faster); host time = until the Python call returns. "
             "`bits` says whether the compiled block's output equals the eager one bit for bit, FP8 / bf16 "
             "(Inductor fuses SiLU·mul in fp32, so a block with it differs from eager in bf16 too).", ""]
    for block in dict.fromkeys(r["block"] for r in rows):
        lines += [f"## {block}", "", "| mode | M | bf16 µs | FP8 µs | speedup | host bf16 µs | host FP8 µs | bits |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in rows if r["block"] == block):
            if "error" in r:
                lines.append(f"| {r['mode']} | {r['m']} | | | | | | error: {r['error']} |")
                continue
            bits = "" if "fp8_equals_eager" not in r else " / ".join(
                "equal" if r[f"{p}_equals_eager"] else "differ" for p in ("fp8", "bf16"))
            lines.append(f"| {r['mode']} | {r['m']} | {r['bf16_us']:.1f} | {r['fp8_us']:.1f} | "
                         f"**{r['speedup']:.2f}×** | {r['bf16_host_us']:.1f} | {r['fp8_host_us']:.1f} | {bits} |")
        lines.append("")
    if host:
        h = host[0]
        lines += [f"## Host time per call (M={h['m']}, N={h['n']}, K={h['k']}, best of 5 × 200 calls)", "",
                  "| call | host µs | × F.linear | × empty launch |", "|---|---:|---:|---:|"]
        lines += [f"| {r['call']} | {r['host_us']:.1f} | {r['vs_f_linear']:.2f} | {r['vs_empty_launch']:.2f} |"
                  for r in host]
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    fig, axes = plt.subplots(1, len(blocks), figsize=(6 * len(blocks), 4), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        for mode in MODES:
            pts = [(r["m"], r["speedup"]) for r in rows if r["block"] == block and r["mode"] == mode and "speedup" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="M (tokens)", ylabel="bf16 time / FP8 time", title=block)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    device = torch.device(args.device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bench --model: needs a CUDA GPU")
        return 2
    gpu = torch.cuda.get_device_name(device)
    out = Path(args.out or f"docs/results/{gpu_slug(gpu)}")
    out.mkdir(parents=True, exist_ok=True)
    ms = [int(v) for v in args.m.split(",")] if args.m else list(M_VALUES)
    blocks = [b.strip() for b in (args.blocks or ",".join(BLOCKS)).split(",")]
    modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",")]
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    command = "fp8dispatch bench --model" + "".join(f" --{k} {v}" for k, v in (("m", args.m), ("blocks", args.blocks),
                                                                                 ("modes", args.modes),
                                                                                 ("budget", args.budget)) if v)
    # One compiled forward per block serves each mode's token counts (a few graphs each): room for all.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    start = time.perf_counter()
    deadline = start + args.budget if args.budget else float("inf")

    def save(rows, host):
        env["seconds"] = time.perf_counter() - start
        (out / "model.json").write_text(json.dumps({"env": env, "command": command, "rows": rows, "host": host},
                                                   indent=1))
        (out / "model.md").write_text(markdown(env, rows, host, command))

    host = host_rows(device)
    for r in host:
        print(f"  host {r['call']:<28} {r['host_us']:7.1f} µs  {r['vs_f_linear']:5.2f}× F.linear  "
              f"{r['vs_empty_launch']:5.2f}× empty launch")
    rows = []
    for block in blocks:
        rows += model_rows(block, ms, modes, device, print, deadline)
        save(rows, host)
    png = plot(out / "model.png", rows)
    print(f"wrote {out / 'model.json'}, {out / 'model.md'}" + (f", {png}" if png else "") +
          f" in {env['seconds']:.0f} s")
    return 0
