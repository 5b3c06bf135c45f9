#!/usr/bin/env python
"""Benchmark of the fused PEG against eager PyTorch and torch.compile.

For every shape, dtype and pass it times, side by side in one process:

    eager                 cpvt_kernels.PEG (split, transpose, depthwise conv, add, concat)
    compile               torch.compile(PEG), default mode
    compile-max-autotune  torch.compile(PEG, mode="max-autotune-no-cudagraphs") (GPU only)
    copy                  x.clone(): a copy of the same tokens, the forward's floor (fwd only)
    <backend>             cpvt_kernels.FusedPEG(backend=...) for each fused backend of the device
    cuda-tile             the cuda backend with CPVT_CUDA_KERNELS=tile (its tiled kernels)
    cuda-stream           the cuda backend with CPVT_CUDA_KERNELS=stream (its streaming kernels)
    cuda-pipe             the cuda backend with CPVT_CUDA_KERNELS=pipe (the experimental cp.async
                          kernels; the streaming ones elsewhere)
    triton-stream         the triton backend with CPVT_TRITON_KERNELS=stream (3x3 streaming kernels)

Passes: ``fwd`` (forward under ``torch.no_grad()``), ``bwd`` (backward of a retained graph:
grad of x, weight and bias) and ``fwdbwd`` (forward and that backward).

Bytes, the least a PEG must move (``S = B * (P + H*W) * C * itemsize``): forward reads x and
writes out, ``2 S``; backward reads grad_out and x and writes grad_x, ``3 S``; forward+backward
``5 S``. GB/s is that over the median time; "% copy" divides it by the copy bandwidth measured at
the start of the same run (``dst.copy_(src)`` of 256 MiB, bytes read plus written), and "% size
copy" by the GB/s of the ``copy`` implementation at the same shape and dtype (a copy of these
very tokens, timed in the same rounds: what a copy achieves at this size and in these caches).

The samples of one shape, dtype and pass are taken in ``--rounds`` rounds (default 5) that
alternate between the implementations, so that a slow period of a shared host slows them alike
and the speedups, which are ratios of medians, stay steady.

Before timing, every implementation's output (and gradients, when a backward pass is timed) is
compared with the float64 reference on the same inputs; a fused backend outside the tolerance
in the README ("Using it") is reported as a failure and not timed, and the program exits non-zero.

Usage::

    python bench/bench_peg.py --quick              # CPVT-Ti shapes, about a minute on 2 CPU cores
    python bench/bench_peg.py                      # CPVT-Ti/S/B at 224, 384 and 512 px
    python bench/bench_peg.py --device cuda --dtypes bfloat16 --shapes 256x384x24 --passes fwd

Writes ``peg.csv`` (one row per measurement, each with device, versions, commit and date),
``peg.md`` and ``peg.png`` to ``--out`` (default ``bench/results/<date>_<device>/``).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import csv
import datetime
import importlib.util
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Benchmark the source tree this script sits in when its extension is built there (in place or
# editable install); otherwise the installed package.
if list((REPO / "cpvt_kernels").glob("_C*")) or importlib.util.find_spec("cpvt_kernels") is None:
    sys.path.insert(0, str(REPO))

import cpvt_kernels as ck  # noqa: E402
from cpvt_kernels import _checks  # noqa: E402
from cpvt_kernels.reference import peg_reference  # noqa: E402
from cpvt_kernels.selfcheck import cpu_name, dist_version  # noqa: E402

RESULTS = REPO / "bench" / "results"

# The README's tolerances ("Using it"): max |out - ref| / max |ref| against the float64
# reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
             torch.bfloat16: 1.6e-2}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "float64": torch.float64, "fp64": torch.float64}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}
PASSES = ("fwd", "bwd", "fwdbwd")
# Bytes moved per pass, in units of B * N * C * itemsize.
PASS_BYTES = {"fwd": 2, "bwd": 3, "fwdbwd": 5}
BYTES_NOTE = ("bytes = the least a PEG moves, S = B*(P+H*W)*C*itemsize: fwd 2S (read x, write "
              "out), bwd 3S (read grad_out and x, write grad_x), fwdbwd 5S")
COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune-no-cudagraphs"}
# x.clone(), timed in the forward pass beside the others: a copy of the same bytes.
COPY_IMPL = "copy"
BASELINES = ("eager",) + tuple(COMPILE_MODES) + (COPY_IMPL,)
COPY_MIB = 256

CSV_FIELDS = ["date", "device", "device_type", "threads", "torch", "triton", "python", "cuda",
              "cpvt_kernels", "commit", "mode", "pass", "dtype", "B", "C", "H", "W", "P", "k",
              "impl", "median_ms", "p20_ms", "p80_ms", "reps", "bytes", "gbps", "copy_gbps",
              "frac_copy", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_mib",
              "faults_per_call", "max_rel_err", "status", "host_ms", "frac_size_copy"]


@dataclass(frozen=True)
class Case:
    """One PEG shape: x is (B, P + H*W, C), weight (C, 1, k, k)."""
    B: int
    C: int
    H: int
    W: int
    P: int = 1
    k: int = 3

    @property
    def N(self) -> int:
        return self.P + self.H * self.W

    def label(self) -> str:
        hw = f"H=W={self.H}" if self.H == self.W else f"H={self.H} W={self.W}"
        return f"B={self.B} C={self.C} {hw} P={self.P} k={self.k}"

    def short(self) -> str:
        hw = f"{self.H}" if self.H == self.W else f"{self.H}x{self.W}"
        return f"{self.B}x{self.C}x{hw} P{self.P} k{self.k}"


# ---------------------------------------------------------------------------------------------
# Shapes

QUICK_CASES = [Case(32, 192, h, h, 1, k) for h in (14, 24) for k in (3, 7)]


def full_cases(device_type: str) -> list[Case]:
    """CPVT-Ti/S/B (C = 192/384/768) at 224/384/512 pixels (H = W = 14/24/32),
    P = 1 and k = 3, plus k = 7 and P = 0 at a few of them.

    Every shape costs two torch.compile graphs per dtype (with and without autograd), so the
    batch sweep runs at 224 pixels and the larger images at the largest batch: B = 1, 32, 256
    and 256 on a GPU; on a CPU B = 1, 32 and 32, 8 so that the run takes about ten minutes.
    """
    widths = (192, 384, 768)
    if device_type == "cuda":
        sweep, big = (1, 32, 256), {24: 256, 32: 256}
    else:
        sweep, big = (1, 32), {24: 32, 32: 8}
    cases = [Case(B, C, 14, 14) for C in widths for B in sweep]
    cases += [Case(big[s], C, s, s) for s in (24, 32) for C in widths]
    cases += [Case(big[24], 192, s, s, 1, 7) for s in (14, 24)]
    cases += [Case(big[24], 384, s, s, 0, 3) for s in (14, 24)]
    return cases


def parse_shape(text: str, prefixes, kernels) -> list[Case]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:x(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"--shapes: expected BxCxH or BxCxHxW (e.g. 32x192x14), got {text!r}")
    B, C, H = int(m[1]), int(m[2]), int(m[3])
    W = int(m[4]) if m[4] else H
    if min(B, C, H, W) < 1:
        raise argparse.ArgumentTypeError(
            f"--shapes: B, C, H and W must be 1 or more (an empty tensor moves no bytes to time), "
            f"got {text!r}")
    return [Case(B, C, H, W, P, k) for P in prefixes for k in kernels]


def _int_list(text: str, flag: str, ok, expected: str) -> list[int]:
    """The comma-separated ints of ``flag``'s ``text``, each passing ``ok``; else an exit whose
    message names the flag and says what it expected."""
    try:
        values = [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        values = []
    if not values or not all(ok(v) for v in values):
        raise SystemExit(f"{flag}: expected {expected}, got {text!r}")
    return values


def _name_list(values) -> list[str]:
    out = []
    for v in values or []:
        out += [s for s in re.split(r"[,\s]+", v.strip()) if s]
    return out


# ---------------------------------------------------------------------------------------------
# Run metadata shared with bench_model.py

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    name = device_name(device)
    return slug(name) if device.type == "cuda" else "cpu-" + slug(name)


def git_commit() -> str:
    """Short hash of HEAD, with "-dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(device: torch.device) -> dict:
    """The columns every CSV row carries: device, versions, commit and date."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        "cpvt_kernels": ck.__version__,
        "commit": git_commit(),
    }


def default_out_dir(device: torch.device) -> Path:
    return RESULTS / f"{datetime.date.today().isoformat()}_{device_slug(device)}"


def pick_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and device.index is None:
        # An explicit index: torch.cuda.set_device rejects a bare "cuda" in some releases (2.11).
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------------------------------------
# Timing

def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    faults_per_call: float | None = None  # CPU: minor page faults of the process per sample
    host_ms: float | None = None  # GPU: median host time of one call (launch overhead)


@dataclass
class Samples:
    """Per-call times (ms), pooled over the rounds of one measurement."""
    times: list
    host: list  # GPU: host ms of each call
    faults: int | None = None  # CPU: minor page faults of the process over the samples

    def extend(self, other: Samples) -> None:
        self.times += other.times
        self.host += other.host
        if other.faults is not None:
            self.faults = (self.faults or 0) + other.faults

    def stats(self) -> Stats:
        times = sorted(self.times)
        return Stats(statistics.median(times), percentile(times, 0.2), percentile(times, 0.8),
                     len(times), None if self.faults is None else self.faults / len(times),
                     statistics.median(self.host) if self.host else None)


def minor_faults() -> int:
    """Minor page faults of this process so far (all its threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit


def keep_freed_memory() -> str | None:
    """Makes glibc malloc keep freed memory for reuse; returns why not, or None when done.

    By default glibc returns memory to the system when the top of the heap is free beyond a
    threshold (and serves large blocks with mmap until a free raises its threshold), so a call
    can find that the memory an earlier call freed is gone and pay a page fault per 4 KiB
    touched, zeroed by the kernel. Whether that happens depends on the order of allocations and
    frees, so it strikes one implementation and not another, or one run and not the next (up to
    a thousand faults and a millisecond per call of the eager PEG's forward+backward at the
    CPVT-Ti shape on a 2-core EPYC). Heap trimming off and every block up to 32 MiB from the heap,
    freed tensors are reused as PyTorch's caching allocator reuses them on a GPU, and as the
    allocators that PyTorch's CPU launcher (torch.backends.xeon.run_cpu) preloads do. Blocks
    above 32 MiB still come from mmap; ``faults_per_call`` in the CSV shows any faults left.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not glibc malloc ({platform.system()} {platform.libc_ver()[0] or 'other libc'})"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:
        return f"mallopt unavailable ({e})"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
            and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return "mallopt refused the settings"
    return None


def add_allocator_arg(p: argparse.ArgumentParser) -> None:
    """The ``--keep-freed-memory`` switch shared by the benchmarks."""
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: glibc malloc keeps freed memory for reuse (no heap trimming, "
                        f"blocks up to {KEEP_MMAP_THRESHOLD >> 20} MiB from the heap), so no call "
                        "pays page faults for "
                        "memory an earlier call freed, as with a GPU's caching allocator "
                        "(default: on for a CPU; --no-keep-freed-memory keeps glibc's defaults)")


def setup_allocator(keep: bool | None, device: torch.device) -> str | None:
    """Applies ``--keep-freed-memory`` (default: on for a CPU); the note for the results, if any."""
    if device.type != "cpu":
        return None
    if keep is False:
        return ("allocator: glibc's defaults (--no-keep-freed-memory): calls may pay page faults "
                "for memory returned to the system")
    failed = keep_freed_memory()
    if failed:
        print(f"warning: --keep-freed-memory: {failed}; the allocator keeps its defaults",
              file=sys.stderr)
        return f"allocator: the C library's defaults ({failed})"
    return (f"allocator: glibc malloc keeps freed memory (mallopt: no heap trimming, blocks up "
            f"to {KEEP_MMAP_THRESHOLD >> 20} MiB from the heap), as a GPU's caching allocator "
            f"does")


def faults_note(rows: list[dict], describe) -> str | None:
    """The measurements with a page fault or more per call, ``describe(row)`` naming each."""
    counted = [r for r in rows if r.get("faults_per_call") not in ("", None)]
    if not counted:
        return None
    faulty = [r for r in counted if float(r["faults_per_call"]) >= 1]
    if not faulty:
        return "page faults: fewer than 1 per call in every measurement"
    return ("page faults (minor faults of the process while timing, each a 4 KiB page the "
            "kernel zeroes): " + "; ".join(f"{describe(r)}: {float(r['faults_per_call']):.0f} "
                                          f"per call" for r in faulty))


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache (Linux sysfs), or None."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if m:
            sizes.append(int(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]])
    return max(sizes) if sizes else None


class Timer:
    """Times a callable: warmup, then one sample per call; median and the p20-p80 spread.

    CPU: ``time.perf_counter`` around each call. GPU: CUDA events around each call, with the GPU
    held busy by a spin kernel (``torch.cuda._sleep``, longer than the call's host time) before
    the first event, so the call's kernels are all queued when the timing starts: the samples are
    device time, without the host's launch overhead, which is reported apart (``host_ms``, the
    median host time of a call). With ``flush_cache``, a buffer larger than the last-level cache
    is written (GPU: 256 MiB) or read (CPU: twice the cache) before each call, so the inputs come
    from DRAM.
    The number of samples is ``min_time / (time per call)``, clamped to ``[min_reps, max_reps]``.
    CPU: the minor page faults of the process over the samples are counted too.
    """

    def __init__(self, device: torch.device, min_time: float, min_reps: int = 5,
                 max_reps: int = 1000, flush_cache: bool = False):
        self.cuda = device.type == "cuda"
        self.min_time, self.min_reps, self.max_reps = min_time, min_reps, max_reps
        self.flush = None
        if flush_cache:
            nbytes = COPY_MIB * 2**20 if self.cuda else \
                min(max(2 * (last_level_cache_bytes() or 0), 64 * 2**20), 1024 * 2**20)
            self.flush = torch.ones(nbytes // 4, dtype=torch.int32, device=device)
        self._spin_cycles_per_ms = None

    def _spin_cycles(self, ms: float) -> int:
        """Cycles of ``torch.cuda._sleep`` that keep the GPU busy for about ``ms``."""
        if self._spin_cycles_per_ms is None:
            cycles = 1_000_000
            torch.cuda._sleep(cycles)  # warm up
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._spin_cycles_per_ms = cycles / max(begin.elapsed_time(end), 1e-3)
        return max(1, int(ms * self._spin_cycles_per_ms))

    def _flush(self):
        if self.flush is not None:
            # Writing on a GPU (as Triton's do_bench); reading on a CPU, which leaves no dirty
            # lines for the timed call to write back.
            if self.cuda:
                self.flush.zero_()
            else:
                self.flush.max()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def calibrate(self, fn) -> tuple[int, float]:
        """Warms ``fn`` up; returns the number of samples ``min_time`` asks for and the seconds
        of one synchronous call."""
        fn()
        self._sync()
        n, start = 0, time.perf_counter()
        while True:
            fn()
            self._sync()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= 0.2 * self.min_time or n >= 50:
                break
        per_call = elapsed / n
        reps = int(min(max(self.min_time / max(per_call, 1e-7), self.min_reps), self.max_reps))
        return reps, per_call

    def sample(self, fn, reps: int, per_call: float, warm: bool = False) -> Samples:
        """``reps`` timed calls of ``fn`` (calibrated: ``per_call`` seconds each). ``warm``: one
        untimed call first, as after another implementation's calls the first finds the caches
        and the allocator as that one left them."""
        if warm:
            fn()
            self._sync()
        if self.cuda:
            # The spin outlasts the host time of a call (bounded by its synchronous time above),
            # so the call is queued before its first event fires.
            spin = self._spin_cycles(min(max(1.5 * per_call * 1e3, 0.05), 2.0))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            host = []
            for begin, end in events:
                self._flush()
                torch.cuda._sleep(spin)
                begin.record()
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e3)
                end.record()
            torch.cuda.synchronize()
            return Samples([begin.elapsed_time(end) for begin, end in events], host)
        times = []
        faults0 = minor_faults()
        for _ in range(reps):
            self._flush()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return Samples(times, [], minor_faults() - faults0)

    def __call__(self, fn) -> Stats:
        reps, per_call = self.calibrate(fn)
        return self.sample(fn, reps, per_call).stats()


def peak_memory_mib(device: torch.device, fn) -> float | None:
    """Peak memory one call allocates beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device: torch.device, timer: Timer) -> tuple[float, Stats]:
    """GB/s of ``dst.copy_(src)`` on 256 MiB, counting bytes read plus written."""
    n = COPY_MIB * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.5)
    dst = torch.empty_like(src)
    flush, timer.flush = timer.flush, None  # the copy is far larger than any cache
    min_reps, timer.min_reps = timer.min_reps, max(timer.min_reps, 10)
    try:
        stats = timer(lambda: dst.copy_(src))
    finally:
        timer.flush, timer.min_reps = flush, min_reps
    gbps = 2 * src.numel() * src.element_size() / (stats.median_ms * 1e-3) / 1e9
    return gbps, stats


def cpu_load_warning(device: torch.device) -> str | None:
    """A note when other processes keep the CPU busy: CPU timings are then noisy."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load < 0.5:
        return None
    return (f"load average {load:.1f} on {cores} cores when the run started: other processes "
            f"compete for the CPU, so the times are noisy")


def check_overhead_us(device: torch.device) -> float:
    """Microseconds of the Python input checks that PEG.forward runs (and fused_peg for the
    backends without C++ checks of their own), with warm caches."""
    x = torch.randn(2, 1 + 4 * 4, 8, device=device)
    w = torch.randn(8, 1, 3, 3, device=device)
    b = torch.randn(8, device=device)
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        _checks.check_inputs(x, w, b, 4, 4, 1)
    return (time.perf_counter() - t0) / reps * 1e6


# ---------------------------------------------------------------------------------------------
# Implementations and passes

def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    denom = ref.abs().max().item() if ref.numel() else 0.0
    diff = (a - ref).abs().max().item() if a.numel() else 0.0
    return diff / denom if denom > 0 else diff


# Variants of a fused backend, timed beside it: (backend, environment while it runs).
# ``cuda`` itself runs CPVT_CUDA_KERNELS=auto unless the environment says otherwise.
VARIANTS = {"cuda-tile": ("cuda", {"CPVT_CUDA_KERNELS": "tile"}),
            "cuda-stream": ("cuda", {"CPVT_CUDA_KERNELS": "stream"}),
            "cuda-pipe": ("cuda", {"CPVT_CUDA_KERNELS": "pipe"}),
            "triton-stream": ("triton", {"CPVT_TRITON_KERNELS": "stream"})}


@contextlib.contextmanager
def impl_env(name: str):
    """The environment settings of implementation ``name`` (VARIANTS), restored afterwards."""
    settings = VARIANTS.get(name, (None, {}))[1]
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def error_status(e: Exception) -> str:
    """The status column of an implementation that raised ``e``: its type and first line."""
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def fused_backends(device: torch.device) -> list[str]:
    """The fused backends to time: every available one but reference (that is the eager PEG),
    and their VARIANTS.

    Triton on CPU tensors runs only through its interpreter, which is not a fast path.
    """
    names = [n for n in ck.available_backends(device.type) if n != "reference"]
    if device.type == "cpu":
        names = [n for n in names if n != "triton"]
    return names + [v for v, (base, _) in VARIANTS.items() if base in names]


class CopyTokens(torch.nn.Module):
    """``x.clone()``: the tokens copied into a new tensor, as a PEG's forward writes its output
    into one; the floor of a forward that reads x once and writes out once."""

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x.clone()


def impl_passes(name: str, passes: list[str]) -> list[str]:
    """The passes ``name`` is timed in: the copy in the forward only (it has no backward)."""
    return [p for p in passes if p == "fwd"] if name == COPY_IMPL else list(passes)


def build_impls(names: list[str], peg: torch.nn.Module) -> dict:
    """Callables ``m(x, H, W)`` sharing ``peg``'s parameters, keyed by implementation name."""
    impls = {}
    for name in names:
        if name == "eager":
            impls[name] = peg
        elif name == COPY_IMPL:
            impls[name] = CopyTokens()
        elif name in COMPILE_MODES:
            impls[name] = torch.compile(peg, mode=COMPILE_MODES[name])
        else:
            fused = ck.FusedPEG(peg.proj.in_channels, peg.proj.kernel_size,
                                peg.num_prefix_tokens, peg.proj.bias is not None,
                                backend=VARIANTS.get(name, (name,))[0])
            fused.proj = peg.proj
            impls[name] = fused
    return impls


def make_pass(pass_name: str, m, x: torch.Tensor, xg: torch.Tensor, params, g, H, W):
    """A no-argument callable running one pass of ``m``."""
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                m(x, H, W)
        return run
    if pass_name == "fwdbwd":
        def run():
            out = m(xg, H, W)
            torch.autograd.grad(out, params, g)
        return run
    out = m(xg, H, W)

    def run():
        torch.autograd.grad(out, params, g, retain_graph=True)
    return run


def reference_outputs(case: Case, x, params, g, need_grads: bool):
    """The float64 reference output and, with ``need_grads``, its gradients of x, weight, bias."""
    x64 = x.detach().double().requires_grad_(need_grads)
    w64, b64 = (p.detach().double().requires_grad_(need_grads) for p in params[1:])
    with torch.set_grad_enabled(need_grads):
        ref = peg_reference(x64, w64, b64, case.H, case.W, case.P)
    grads = torch.autograd.grad(ref, (x64, w64, b64), g.double()) if need_grads else ()
    return ref.detach(), grads


def parity_error(m, case: Case, x, xg, params, g, ref, ref_grads) -> float:
    """Max relative error of ``m`` against the float64 reference: the output and, when
    ``ref_grads`` are given, every gradient."""
    with torch.no_grad():
        err = rel_err(m(x, case.H, case.W), ref)
    if ref_grads:
        out = m(xg, case.H, case.W)
        grads = torch.autograd.grad(out, params, g)
        err = max([err, rel_err(out, ref)] + [rel_err(a, r) for a, r in zip(grads, ref_grads)])
    return err


# ---------------------------------------------------------------------------------------------
# Output

def _fmt(v, spec: str, blank: str = "") -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return blank
    return format(float(v), spec)


MD_HEADER = ("| pass | dtype | shape (B x C x H=W, P, k) | impl | median ms | p20-p80 ms | GB/s "
             "| % copy | % size copy | x eager | x compile | peak MiB | host ms | status |")
MD_RULE = "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"


def md_row(r: dict) -> str:
    case = Case(int(r["B"]), int(r["C"]), int(r["H"]), int(r["W"]), int(r["P"]), int(r["k"]))
    spread = (f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}"
              if r["median_ms"] not in ("", None) else "")
    frac = _fmt(r["frac_copy"], ".0%")
    size_frac = _fmt(r.get("frac_size_copy"), ".0%")
    return (f"| {r['pass']} | {r['dtype']} | {case.short()} | {r['impl']} | "
            f"{_fmt(r['median_ms'], '.3f')} | {spread} | {_fmt(r['gbps'], '.1f')} | {frac} | "
            f"{size_frac} | "
            f"{_fmt(r['speedup_vs_eager'], '.2f')} | {_fmt(r['speedup_vs_compile'], '.2f')} | "
            f"{_fmt(r['peak_mem_mib'], '.1f', '-')} | {_fmt(r.get('host_ms'), '.3f', '-')} | "
            f"{r['status']} |")


def summary_rows(rows: list[dict]) -> list[str]:
    """Per implementation, pass and dtype: geometric-mean speedups and median % copy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and r["impl"] != "eager":
            groups.setdefault((r["impl"], r["pass"], r["dtype"]), []).append(r)
    lines = ["| impl | pass | dtype | shapes | x eager (geo-mean, min-max) | x compile (geo-mean) "
             "| % copy (median) | % size copy (median) |", "|---|---|---|--:|--:|--:|--:|--:|"]

    def geo(vals):
        vals = [float(v) for v in vals if v not in ("", None)]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None

    for (impl, p, dt), rs in sorted(groups.items()):
        se = [float(r["speedup_vs_eager"]) for r in rs if r["speedup_vs_eager"] not in ("", None)]
        sc = [r["speedup_vs_compile"] for r in rs]
        fr = [float(r["frac_copy"]) for r in rs if r["frac_copy"] not in ("", None)]
        fs = [float(r["frac_size_copy"]) for r in rs if r.get("frac_size_copy") not in ("", None)]
        rng = f" ({min(se):.2f}-{max(se):.2f})" if se else ""
        lines.append(f"| {impl} | {p} | {dt} | {len(rs)} | {_fmt(geo(se), '.2f')}{rng} | "
                     f"{_fmt(geo(sc), '.2f')} | "
                     f"{_fmt(statistics.median(fr) if fr else None, '.0%')} | "
                     f"{_fmt(statistics.median(fs) if fs else None, '.0%')} |")
    return lines


def markdown(rows: list[dict], meta: dict, notes: list[str]) -> str:
    lines = [f"# Fused PEG benchmark: {meta['device']}", "",
             f"- date {meta['date']}, commit {meta['commit']}, mode {meta['mode']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, "
             f"CUDA {meta['cuda']}, cpvt_kernels {meta['cpvt_kernels']}"
             + (f", {meta['threads']} CPU threads" if meta["threads"] != "" else "")]
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Summary", ""] + summary_rows(rows)
    lines += ["", "## All measurements", "", MD_HEADER, MD_RULE] + [md_row(r) for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fused PEG vs eager PEG vs torch.compile: time, GB/s, % of copy bandwidth.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shapes: BxCxH or BxCxHxW, e.g. --shapes 32x192x14 256x384x24; "
               "each is run for every --prefix-tokens and --kernel-sizes value.")
    p.add_argument("--quick", action="store_true",
                   help="CPVT-Ti (B=32, C=192) at H=W=14 and 24, k=3 and 7, fp32 and bf16, "
                        "fwd and fwdbwd, default torch.compile only (about a minute on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtypes", nargs="+", default=None, metavar="DTYPE",
                   help="float32 bfloat16 float16 (default: float32 bfloat16, plus float16 on a "
                        "GPU outside --quick)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="BxCxH[xW]",
                   help="shapes to run (default: see --quick)")
    p.add_argument("--prefix-tokens", default=None, metavar="P[,P]",
                   help="P values for --shapes, comma-separated (default 1)")
    p.add_argument("--kernel-sizes", default=None, metavar="K[,K]",
                   help="k values for --shapes, comma-separated (default 3)")
    p.add_argument("--passes", default=None, metavar="fwd,bwd,fwdbwd",
                   help="comma-separated from fwd,bwd,fwdbwd "
                        "(default: all; fwd,fwdbwd with --quick)")
    p.add_argument("--impls", nargs="+", default=None, metavar="IMPL",
                   help="subset of eager, compile, compile-max-autotune, copy and the fused "
                        "backends (default: all that run here)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default bench/results/<date>_<device>/)")
    p.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                   help="seconds of samples per measurement (default 0.2 quick, 0.5 full on CPU; "
                        "0.1 on a GPU)")
    p.add_argument("--min-reps", type=int, default=5, metavar="N",
                   help="fewest samples per measurement")
    p.add_argument("--rounds", type=int, default=5, metavar="R",
                   help="rounds the samples of each shape, dtype and pass are taken in, "
                        "alternating between the implementations (default 5; 1: each "
                        "implementation's samples in one block)")
    p.add_argument("--flush-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="evict the inputs from the last-level cache before each timed call "
                        "(default: on for a GPU's L2; off on a CPU, where the shapes that fit "
                        "stay in cache as they would between a model's layers)")
    add_allocator_arg(p)
    p.add_argument("--autotune-min-batch", type=int, default=256, metavar="B",
                   help="GPU: run compile-max-autotune (tens of seconds of autotuning per graph) "
                        "only for shapes with B >= this (default 256)")
    p.add_argument("--autotune-dtypes", nargs="+", default=["bfloat16"], metavar="DTYPE",
                   help="GPU: the dtypes compile-max-autotune runs for (default bfloat16)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (torch.set_num_threads; default: PyTorch's choice)")
    p.add_argument("--no-plot", action="store_true", help="skip peg.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected 1 or more, got {args.threads}")
        torch.set_num_threads(args.threads)
    allocator = setup_allocator(args.keep_freed_memory, device)
    if on_gpu:
        torch.cuda.set_device(device)
        # Every implementation computes in true float32, as the fused kernels do.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    dtype_names = _name_list(args.dtypes) or (
        ["float32", "bfloat16"] + (["float16"] if on_gpu and not args.quick else []))
    try:
        dtypes = [DTYPE_NAMES[d.lower()] for d in dtype_names]
        autotune_dtypes = [DTYPE_NAMES[d.lower()] for d in _name_list(args.autotune_dtypes)]
    except KeyError as e:
        raise SystemExit(f"--dtypes: expected float32, bfloat16, float16 or float64, got {e}")
    passes = [s for s in (args.passes or ("fwd,fwdbwd" if args.quick else ",".join(PASSES)))
              .split(",") if s]
    for s in passes:
        if s not in PASSES:
            raise SystemExit(f"--passes: expected a comma-separated subset of {PASSES}, got {s!r}")
    if args.shapes:
        prefixes = _int_list(args.prefix_tokens or "1", "--prefix-tokens", lambda v: v >= 0,
                             "comma-separated ints >= 0")
        kernels = _int_list(args.kernel_sizes or "3", "--kernel-sizes",
                            lambda v: v % 2 == 1 and 1 <= v <= 31,
                            "comma-separated odd ints from 1 to 31")
        try:
            cases = [c for s in args.shapes for c in parse_shape(s, prefixes, kernels)]
        except argparse.ArgumentTypeError as e:
            raise SystemExit(str(e))
    else:
        for flag, value in (("--prefix-tokens", args.prefix_tokens),
                            ("--kernel-sizes", args.kernel_sizes)):
            if value is not None:
                raise SystemExit(f"{flag}: applies to the shapes of --shapes, which was not given")
        cases = list(QUICK_CASES if args.quick else full_cases(device.type))

    backends = fused_backends(device)
    modes = ["compile"] + (["compile-max-autotune"] if on_gpu and not args.quick else [])
    available = ["eager"] + modes + [COPY_IMPL] + backends
    names = _name_list(args.impls) or available
    for n in names:
        if n not in available + ["compile-max-autotune"]:
            raise SystemExit(f"--impls: {n!r} cannot run on {device.type}; expected a subset of "
                             f"{available}")
    if "compile-max-autotune" in names and not on_gpu:
        raise SystemExit("--impls: compile-max-autotune is benchmarked on a GPU only")
    if "eager" not in names:
        names = ["eager"] + names  # speedups are relative to it
    # The command line, so that a committed result says how to produce it again.
    notes = ["command: python bench/bench_peg.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])]
    missing = None
    if not backends:
        missing = ("no fused backend is available on this device: "
                   + "; ".join(f"{b}: {ck.ops._unavailable_reason(b, device.type)}"
                               for b in ("cuda", "triton", "cpu")
                               if ck.ops._unavailable_reason(b, device.type)))
        notes.append(missing)
    if device.type == "cpu" and "triton" in ck.available_backends("cpu"):
        notes.append("triton is excluded on CPU (it runs there only through its interpreter)")

    min_time = args.min_time or (0.1 if on_gpu else (0.2 if args.quick else 0.5))
    if args.rounds < 1:
        raise SystemExit(f"--rounds: expected 1 or more, got {args.rounds}")
    if args.min_reps < 1:
        raise SystemExit(f"--min-reps: expected 1 or more, got {args.min_reps}")
    if args.min_time is not None and not args.min_time > 0:
        raise SystemExit(f"--min-time: expected a number of seconds above 0, got {args.min_time}")
    rounds = args.rounds
    flush = on_gpu if args.flush_cache is None else args.flush_cache
    timer = Timer(device, min_time, args.min_reps, flush_cache=flush)
    out_dir = args.out or default_out_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(device)
    meta["mode"] = "quick" if args.quick else ("custom" if args.shapes else "full")

    print(f"device: {meta['device']} ({device.type}"
          + (f", {meta['threads']} threads" if not on_gpu else "") + ")")
    print(f"torch {meta['torch']}  triton {meta['triton']}  python {meta['python']}  "
          f"commit {meta['commit']}")
    print(f"implementations: {', '.join(names)}")
    if missing:
        # Said now, not only in the notes at the end: a run without a fused backend times only
        # the eager PEG and torch.compile of it.
        print(f"warning: {missing}", file=sys.stderr)
    copy_gbps, copy_stats = copy_bandwidth(device, timer)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (dst.copy_(src), {COPY_MIB} MiB, read + write; "
          f"median of {copy_stats.reps}, p20-p80 {copy_stats.p20_ms:.2f}-"
          f"{copy_stats.p80_ms:.2f} ms)")
    check_us = check_overhead_us(device)
    notes += [f"copy bandwidth {copy_gbps:.1f} GB/s: dst.copy_(src) of {COPY_MIB} MiB, bytes "
              f"read + written, median of {copy_stats.reps}, measured at the start of this run",
              BYTES_NOTE,
              "fwd runs under torch.no_grad(); bwd is the backward of a retained graph (grads of "
              "x, weight, bias); fwdbwd is both",
              "times: median of per-call samples, spread p20-p80; "
              + (f"the samples taken in {rounds} rounds alternating between the "
                 "implementations, so that host drift moves them alike; " if rounds > 1 else "")
              + ("CUDA events around each call, the GPU held busy (torch.cuda._sleep) until "
                 "the call is queued, so they are device time without the host's launch "
                 "overhead; host ms is the host time of one call (above the device time, a call "
                 "in eager use is bound by its launch overhead)"
                 if on_gpu else "time.perf_counter")
              + (f", caches flushed before each call ({timer.flush.nbytes >> 20} MiB buffer)"
                 if timer.flush is not None else ", inputs may stay in cache between calls"),
              "peak MiB: " + ("torch.cuda.max_memory_allocated during one call, beyond what was "
                              "allocated before it" if on_gpu else
                              "not measured on CPU (PyTorch keeps no CPU allocation statistics)"),
              f"input checks: {check_us:.1f} us per call (warm caches) in Python for the eager "
              "PEG and the triton/reference backends; the cpu and cuda ops check theirs in C++",
              "parity: every implementation vs the float64 reference before timing (the README's "
              "tolerances; fused backends must pass)"]
    if allocator:
        notes.append(allocator)
    if on_gpu:
        notes.append("TF32 disabled: every implementation computes float32 in float32")
    load = cpu_load_warning(device)
    if load:
        print(f"warning: {load}")
        notes.append(load)

    groups = [(c, dt) for c in cases for dt in dtypes]

    autotune_everywhere = "compile-max-autotune" in _name_list(args.impls)
    if "compile-max-autotune" in names and not autotune_everywhere:
        notes.append(f"compile-max-autotune runs at B >= {args.autotune_min_batch} in "
                     f"{', '.join(SHORT[d] for d in autotune_dtypes)} only (each graph autotunes "
                     f"for tens of seconds; --impls compile-max-autotune runs it everywhere)")

    def impls_for(case, dtype):
        return [n for n in names if n != "compile-max-autotune" or autotune_everywhere
                or (case.B >= args.autotune_min_batch and dtype in autotune_dtypes)]

    total = sum(len(impl_passes(n, passes)) for c, dt in groups for n in impls_for(c, dt))
    print(f"{len(cases)} shapes x {len(dtypes)} dtypes x {len(passes)} passes: "
          f"{total} measurements; {BYTES_NOTE}")

    csv_path = out_dir / "peg.csv"
    csv_file = open(csv_path, "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
    writer.writeheader()
    rows, failures = [], []
    done, t_start = 0, time.perf_counter()
    for case, dtype in groups:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{case}{dtype}".encode()))
        torch._dynamo.reset()
        peg = ck.PEG(case.C, case.k, case.P).to(device=device, dtype=dtype)
        with torch.no_grad():
            for prm in peg.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen) / case.k)
        x = torch.randn(case.B, case.N, case.C, generator=gen).to(device=device, dtype=dtype)
        xg = x.clone().requires_grad_()
        g = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
        params = [xg, peg.proj.weight, peg.proj.bias]
        group_names = impls_for(case, dtype)
        errors, broken = {}, {}
        impls = build_impls(group_names, peg)
        ref, ref_grads = reference_outputs(case, x, params, g, any(p != "fwd" for p in passes))
        for name in group_names:
            if name == COPY_IMPL:  # not a PEG: nothing to compare
                continue
            try:
                with impl_env(name):
                    errors[name] = parity_error(impls[name], case, x, xg, params, g, ref,
                                                ref_grads)
            except Exception as e:  # a failing implementation must not stop the others
                broken[name] = error_status(e)
        del ref, ref_grads
        tol = TOLERANCE[dtype]
        for name, err in errors.items():
            if err > tol:
                msg = (f"PARITY FAILURE: {name} {SHORT[dtype]} {case.label()}: max rel err "
                       f"{err:.3g} > {tol:g} against the float64 reference")
                if name in BASELINES:
                    print(f"warning: {msg} (baseline, still timed)", file=sys.stderr)
                else:
                    print(msg, file=sys.stderr)
                    broken[name] = f"parity failure ({err:.2g} > {tol:g})"
        group_rows = []
        for pass_name in passes:
            pass_names = [n for n in group_names if pass_name in impl_passes(n, passes)]
            # Calibrate every implementation, then take its samples in rounds that alternate
            # between them (each round starting one implementation later), so that a slow period
            # of the host falls on all of them alike and the ratios stay steady.
            timed, failed = {}, dict(broken)
            for name in pass_names:
                if name in failed:
                    continue
                try:
                    with impl_env(name):
                        fn = make_pass(pass_name, impls[name], x, xg, params, g, case.H, case.W)
                        reps, per_call = timer.calibrate(fn)
                    timed[name] = (fn, reps, per_call, Samples([], []))
                except Exception as e:
                    failed[name] = error_status(e)
            order = list(timed)
            for r in range(rounds):
                for name in order[r % len(order):] + order[:r % len(order)]:
                    if name in failed:
                        continue
                    fn, reps, per_call, samples = timed[name]
                    n = reps // rounds + (r < reps % rounds)
                    if n == 0:
                        continue
                    try:
                        with impl_env(name):
                            samples.extend(timer.sample(fn, n, per_call, warm=rounds > 1))
                    except Exception as e:
                        failed[name] = error_status(e)
            # One estimate for the whole block, from the pace of the blocks timed so far: the
            # block's time is spent before any of its rows is printed.
            first, done = done + 1, done + len(pass_names)
            eta = (time.perf_counter() - t_start) / max(done, 1) * (total - done)
            for i, name in enumerate(pass_names, first):
                row = dict(meta)
                row.update({"pass": pass_name, "dtype": SHORT[dtype], "B": case.B, "C": case.C,
                            "H": case.H, "W": case.W, "P": case.P, "k": case.k, "impl": name,
                            "max_rel_err": _fmt(errors.get(name), ".3g"), "copy_gbps":
                            f"{copy_gbps:.6g}", "status": failed.get(name, "ok")})
                prefix = f"[{i}/{total}] {pass_name} {SHORT[dtype]} {case.label()} {name}:"
                if name in failed:
                    failures.append(f"{prefix} {failed[name]}")
                    print(f"{prefix} {failed[name]}", flush=True)
                    row.update({k: "" for k in CSV_FIELDS if k not in row})
                    group_rows.append(row)
                    continue
                fn, _, _, samples = timed[name]
                stats = samples.stats()
                with impl_env(name):
                    peak = peak_memory_mib(device, fn)
                nbytes = PASS_BYTES[pass_name] * case.B * case.N * case.C * x.element_size()
                gbps = nbytes / (stats.median_ms * 1e-3) / 1e9
                row.update({"median_ms": f"{stats.median_ms:.6g}", "p20_ms": f"{stats.p20_ms:.6g}",
                            "p80_ms": f"{stats.p80_ms:.6g}", "reps": stats.reps,
                            "bytes": nbytes, "gbps": f"{gbps:.6g}",
                            "frac_copy": f"{gbps / copy_gbps:.5g}",
                            "peak_mem_mib": _fmt(peak, ".2f"),
                            "faults_per_call": _fmt(stats.faults_per_call, ".4g"),
                            "host_ms": _fmt(stats.host_ms, ".6g"),
                            "speedup_vs_eager": "",
                            "speedup_vs_compile": "", "frac_size_copy": ""})
                group_rows.append(row)
                print(f"{prefix} {stats.median_ms:.3f} ms ({stats.p20_ms:.3f}-{stats.p80_ms:.3f}) "
                      f"{gbps:.1f} GB/s {gbps / copy_gbps:.0%} of copy  [eta {eta:.0f} s]",
                      flush=True)
            del timed
        # The copy of these tokens: its GB/s is the rate every pass is measured against.
        copy_row = next((r for r in group_rows if r["impl"] == COPY_IMPL and r["pass"] == "fwd"
                         and r["gbps"] not in ("", None)), None)
        for pass_name in passes:
            same = {r["impl"]: r for r in group_rows if r["pass"] == pass_name}
            for r in same.values():
                if r["median_ms"] in ("", None):
                    continue
                for col, base in (("speedup_vs_eager", "eager"), ("speedup_vs_compile", "compile")):
                    if base in same and same[base]["median_ms"] not in ("", None):
                        r[col] = f"{float(same[base]['median_ms']) / float(r['median_ms']):.5g}"
                if copy_row is not None:
                    r["frac_size_copy"] = f"{float(r['gbps']) / float(copy_row['gbps']):.5g}"
        writer.writerows(group_rows)
        csv_file.flush()
        rows += group_rows
        del peg, impls, x, xg, g, params
        if on_gpu:
            torch.cuda.empty_cache()
    csv_file.close()
    torch._dynamo.reset()
    faults = faults_note(rows, lambda r: f"{r['impl']} {r['pass']} {r['dtype']} "
                                         f"{r['B']}x{r['C']}x{r['H']}"
                                         + (f"x{r['W']}" if r["W"] != r["H"] else "")
                                         + f" P{r['P']} k{r['k']}")
    if faults:
        notes.append(faults)

    md = markdown(rows, meta, notes)
    (out_dir / "peg.md").write_text(md)
    print()
    print(md)
    if not args.no_plot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot import plot_peg
        png = plot_peg(rows, out_dir / "peg.png")
        print(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed; "
                                          "`pip install matplotlib`)")
    print(f"wrote {csv_path}, {out_dir / 'peg.md'}  ({time.perf_counter() - t_start:.0f} s)")
    if failures:
        print(f"\n{len(failures)} FAILED measurement(s):", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
