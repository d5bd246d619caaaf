"""Timing shared by `bench`, `tune` and the kernel benchmarks: GPU medians over L2-flushed runs, and
the host time a call costs its caller."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Larger than the H100's 50 MB and the H200's 60 MB L2, so each timed run starts cold.
_FLUSH_BYTES = 256 * 2**20
_flush_buffer: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    runs: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how far to trust a ratio between two timings."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s else 0.0


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, runs: int = 50, flush_l2: bool = True) -> Timing:
    """Median time of `fn` on the current CUDA stream, events around each run, L2 flushed between."""
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _flush_buffer.get(device)
    if flush_l2 and flush is None:
        flush = _flush_buffer[device] = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        if flush_l2:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
    deciles = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), deciles[0], deciles[-1], runs)


def capture(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn` captured in a CUDA graph (warmed on a side stream first, as torch.cuda.graphs asks);
    returns the replay."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_graph(fn: Callable[[], object], *, runs: int = 50) -> Timing:
    """`fn`'s GPU time alone: captured once, its replays timed by `time_cuda` (no launch cost)."""
    return time_cuda(capture(fn), warmup=2, runs=runs)


def time_host_per_call(fn: Callable[[], object], *, calls: int = 20, rounds: int = 3) -> float:
    """Seconds until `fn` returns, per call, with calls back to back: what an eager caller pays
    before its next call can start, whatever the GPU does. The GPU catches up between rounds; the
    best round counts, since a busy host only ever adds time."""
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    torch.cuda.synchronize()
    return best
