# Shared by floor.py and stream.py: bench_peg on the path, glibc keeping freed memory, 2 threads,
# a header line with the device, versions and commit, and one round of timing.
import os, statistics, sys, time
import torch
import cpvt_kernels  # noqa: F401  (registers torch.ops.cpvt)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../.."))
import bench_peg  # noqa: E402

bench_peg.keep_freed_memory()
torch.set_num_threads(2)
torch.manual_seed(0)
print("# " + ", ".join(f"{k} {v}" for k, v in bench_peg.run_metadata(torch.device("cpu")).items()))


def round_ms(f, warmup: int, reps: int) -> float:
    """Median ms per call of f over reps calls, after warmup calls."""
    for _ in range(warmup):
        f()
    s = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        s.append(time.perf_counter() - t)
    return statistics.median(s) * 1e3
