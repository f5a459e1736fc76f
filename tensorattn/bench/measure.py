"""How the suite measures: warm-ups and repeats with the median, peak memory per case, the harness's
own overhead, and the affine estimate of quadratic backends from a fraction of the query rows."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def others_busy(load1: float | None, own_threads: float = 0.0, margin: float = 0.5) -> bool:
    """True when the 1-minute load ``load1`` says other processes compete for the CPU: the load
    beyond this process's own ``own_threads`` runnable threads exceeds ``margin``."""
    return load1 is not None and load1 - own_threads > margin


@contextlib.contextmanager
def single_thread():
    """Untimed work (references, error experiments) runs on one thread: on a busy machine, many
    small multi-threaded ops each wait for a descheduled partner thread, which costs far more than
    the parallelism gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class LoadProbe:
    """CPU time that *other* processes used while a block ran, as a fraction of all cores.

    The machine's busy jiffies (/proc/stat) minus this process's own CPU time (os.times) over the
    block, divided by the wall time and the core count: 0 on an idle machine, about 1 when other
    processes keep every core busy. Unlike the load average (a 1-minute mean) it covers exactly
    the timed calls. ``foreign`` stays None where /proc/stat is missing or the block was too short
    to resolve (jiffies are 10 ms)."""

    def __init__(self) -> None:
        self.foreign: float | None = None

    def __enter__(self) -> "LoadProbe":
        self._ticks = _cpu_ticks()
        self._own = os.times()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end = _cpu_ticks()
        own = os.times()
        if self._ticks is None or end is None:
            return
        busy, total = end[0] - self._ticks[0], end[1] - self._ticks[1]
        if total <= 0 or time.perf_counter() - self._wall < 0.05:
            return
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        own_ticks = ((own.user - self._own.user) + (own.system - self._own.system)) * hz
        self.foreign = max(0.0, min(1.0, (busy - own_ticks) / total))


@dataclass(frozen=True)
class Timing:
    median: float
    times: tuple[float, ...]
    #: other processes' share of the CPU during the timed calls (``LoadProbe``), None if unknown
    foreign_load: float | None = None
    #: processor time of the calling thread per call (``interleaved`` records it): on a shared
    #: machine, close to the call's time alone on one core when torch runs single-threaded
    cpu_times: tuple[float, ...] = ()

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_times) if self.cpu_times else None

    @property
    def repeats(self) -> int:
        return len(self.times)

    @property
    def spread(self) -> float:
        """(median - fastest) / fastest over the timed calls: 0 for perfectly steady timings."""
        fastest = min(self.times)
        return (self.median - fastest) / fastest if fastest > 0 else 0.0


def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3, min_repeats: int = 2,
            max_seconds: float = 2.0, max_spread: float | None = None) -> tuple[Timing, object]:
    """Run ``fn`` ``warmup`` times untimed, then timed runs: at least ``min_repeats``; then until
    the spread ((median - fastest) / fastest) is at most ``max_spread`` (when given), at most
    ``repeats`` runs, stopping early once the timed runs pass ``max_seconds``. Returns the timing
    (median, every time, the foreign load during the timed runs) and the last result. The timer
    brackets only the call: inputs are built before, errors computed after."""
    result = None
    for _ in range(warmup):
        result = fn()
    times: list[float] = []
    with LoadProbe() as probe:
        while len(times) < max(1, repeats):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
            if len(times) >= min_repeats:
                if sum(times) > max_seconds:
                    break
                if max_spread is not None and len(times) >= 3:
                    med = statistics.median(times)
                    if (med - min(times)) <= max_spread * min(times):
                        break
    return Timing(statistics.median(times), tuple(times), probe.foreign), result


def harness_overhead(samples: int = 2000) -> float:
    """Seconds the timing loop itself adds per timed call (a no-op through ``measure``)."""
    timing, _ = measure(lambda: None, warmup=10, repeats=samples, min_repeats=samples, max_seconds=1e9)
    return timing.median


def _proc_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as fh:
            match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def process_peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM, Linux). ``ru_maxrss`` is the fallback elsewhere;
    on Linux it can include the parent's pages at exec, which VmHWM does not."""
    kib = _proc_kib("VmHWM")
    if kib is None:  # pragma: no cover - not Linux
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The fastest of ``repeats`` timed calls (seconds) and the last result: for scripts that
    compare one size against another in the same run."""
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1,
                max_seconds: float = math.inf, min_rounds: int = 2) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time several calls round-robin: every round calls each of ``fns`` once, so slow phases of a
    shared machine's load hit them alike and their ratio is steadier than from back-to-back blocks.
    ``warmup`` untimed rounds first; fewer than ``rounds`` timed rounds (at least ``min_rounds``) once
    the timed calls pass ``max_seconds``. Returns per name the Timing (median; ``min(times)`` is the
    best of; ``cpu_times`` the calling thread's processor time per call) and the last result."""
    results: dict[str, object] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    for r in range(max(1, rounds)):
        for name, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            results[name] = fn()
            dt = time.perf_counter() - t0
            cpu[name].append(time.thread_time() - c0)
            times[name].append(dt)
            spent += dt
        if r + 1 >= min_rounds and spent > max_seconds:
            break
    timings = {name: Timing(statistics.median(ts), tuple(ts), cpu_times=tuple(cpu[name])) for name, ts in times.items()}
    return timings, results


def in_fresh_process(script: str, *args: object) -> dict:
    """Run ``python script *args`` in a new interpreter (so its peak memory is its own) and return
    the JSON object on the last line of its output; a failing child raises CalledProcessError."""
    res = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _release_free_memory() -> None:
    """Return freed heap pages to the OS so a case cannot hide its peak in memory a previous case
    left resident (glibc keeps freed blocks below its mmap threshold)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class PeakMemory:
    """Peak resident memory a block adds above the RSS at its start.

    Linux only: the kernel's high-water mark VmHWM is reset to the current RSS by writing 5 to
    /proc/self/clear_refs, and read back from /proc/self/status afterwards. This counts every
    allocation (torch's CPU allocator, numpy, Python) that was resident at the peak. Where the
    reset is unavailable ``peak_bytes`` stays None and the report shows n/a.
    """

    method = "VmHWM after clear_refs (Linux), minus RSS at start"

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> "PeakMemory":
        _release_free_memory()
        try:
            with open(_CLEAR_REFS, "w") as fh:
                fh.write("5")
            self._start = _proc_kib("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        hwm = _proc_kib("VmHWM")
        if hwm is not None:
            self.peak_bytes = max(0, hwm - self._start) * 1024
            self.peak_rss_bytes = hwm * 1024


@dataclass(frozen=True)
class AffineEstimate:
    """t(W) = a + b W through two measured fractions (medians); W counts visited key tuples.

    The fixed part a (planning, one pass over the key tiles per query chunk) is not scaled up with
    the rows. When timing noise makes the fit degenerate (t2 <= t1, or a outside [0, t2]) the
    estimate falls back to proportional scaling of the larger fraction, t2 W / W2, which can only
    overstate the time, and says so (``method``)."""

    rows: tuple[int, int]
    work: tuple[float, float]
    seconds: tuple[float, float]
    full_work: float

    @property
    def _fit(self) -> tuple[float, float] | None:
        (w1, w2), (t1, t2) = self.work, self.seconds
        if w2 <= w1 or t2 <= t1:
            return None
        slope = (t2 - t1) / (w2 - w1)
        intercept = t2 - slope * w2
        return (slope, intercept) if 0.0 <= intercept <= t2 else None

    @property
    def method(self) -> str:
        return "affine" if self._fit else "proportional"

    @property
    def slope(self) -> float:
        fit = self._fit
        return fit[0] if fit else self.seconds[1] / self.work[1]

    @property
    def intercept(self) -> float:
        fit = self._fit
        return fit[1] if fit else 0.0

    @property
    def seconds_full(self) -> float:
        return self.intercept + self.slope * self.full_work


def visible_tuples(n: int, m: int, order: int, causal: bool, q_offset: int = 0, rows: int | None = None) -> float:
    """Key tuples the exact softmax visits for queries [q_offset, q_offset + rows) of an n-query
    problem with m keys per slot: m^(k-1) per row, or (i+1)^(k-1) per row i when causal."""
    rows = n if rows is None else rows
    if not causal:
        return float(rows) * float(m) ** (order - 1)
    p = order - 1
    return float(sum(min(i + 1, m) ** p for i in range(q_offset, q_offset + rows)))
