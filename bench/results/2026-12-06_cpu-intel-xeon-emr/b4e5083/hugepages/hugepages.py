"""The cpu backend's huge-page advice for fresh outputs (CPVT_CPU_HUGE_PAGE_BYTES), on and off,
alternating in one process: time per call and page faults per call, float32 forward and
forward+backward at the SPEC shapes whose tensors pass 32 MiB (glibc maps each such block anew),
and below that size, where nothing should change. "kept copy" is x copied into a tensor kept
across calls: the time of the forward's bytes without any page fault.

    python hugepages.py > run1.log
    python hugepages.py 256x768x14 > run3.log     # float32 shapes BxCxH instead of the defaults
"""
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import cpvt_kernels as ck

ROUNDS, CALLS = 8, 6


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(f):
    t = time.perf_counter()
    r = f()
    dt = time.perf_counter() - t
    del r
    return dt


def main():
    torch.set_num_threads(2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"commit {commit} | THP enabled: {thp} | glibc malloc defaults | "
          f"medians of {ROUNDS} rounds x {CALLS} calls, settings alternating by round")
    shapes = [(32, 768, 24, torch.float32), (64, 384, 24, torch.float32),
              (32, 384, 32, torch.float32), (32, 192, 24, torch.float32),
              (32, 768, 24, torch.bfloat16)]
    if sys.argv[1:]:
        shapes = [(*map(int, a.split("x")), torch.float32) for a in sys.argv[1:]]
    for B, C, H, dtype in shapes:
        x = torch.randn(B, 1 + H * H, C, dtype=dtype)
        peg = ck.FusedPEG(C, backend="cpu").to(dtype)
        xg = x.clone().requires_grad_()
        g = torch.randn_like(x)
        kept = torch.empty_like(x)
        mib = x.numel() * x.element_size() / 2**20
        cases = {
            "fwd": lambda: peg(x, H, H),
            "fwdbwd": lambda: torch.autograd.grad(peg(xg, H, H),
                                                  (xg, peg.proj.weight, peg.proj.bias), g),
        }
        copy_ms = statistics.median(timed(lambda: kept.copy_(x)) for _ in range(30)) * 1e3
        for name, f in cases.items():
            times = {"0": [], "": []}
            faults = {"0": 0, "": 0}
            with torch.no_grad() if name == "fwd" else torch.enable_grad():
                for _ in range(ROUNDS):
                    for setting in ("0", ""):
                        os.environ["CPVT_CPU_HUGE_PAGE_BYTES"] = setting
                        timed(f)
                        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        times[setting] += [timed(f) for _ in range(CALLS)]
                        faults[setting] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            off, on = (statistics.median(times[s]) * 1e3 for s in ("0", ""))
            n = ROUNDS * CALLS
            print(f"{name:6s} {str(dtype)[6:]:8s} B={B} C={C} H=W={H} ({mib:.1f} MiB a tensor): "
                  f"advice off {off:.3f} ms ({faults['0'] // n} faults/call), "
                  f"on {on:.3f} ms ({faults[''] // n} faults/call): {off / on:.2f}x"
                  + (f"; kept copy {copy_ms:.3f} ms" if name == "fwd" else ""))


if __name__ == "__main__":
    main()
