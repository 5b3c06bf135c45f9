"""The cpu backward's chunks in waves (CPVT_CPU_PARTIALS_BYTES, default 64 MiB) against every
chunk at once (a budget of 2^50 bytes: the code before 2274f7a), alternating in one process:
time of the backward (all three gradients, float32), the peak memory it adds (VmHWM over
VmRSS, in a fresh process per setting), and the eager PEG's backward for scale. Both settings
must give bitwise the same gradients; the script stops if they do not.

    python partials.py > run1.log
"""
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import cpvt_kernels as ck

ROUNDS = 5
SETTINGS = {"waves (default)": "", "all chunks": str(1 << 50)}
SHAPES = [  # (B, H, C, k): CPVT-S and CPVT-B at 224 px with k 3 and 7 (one wave either way),
    (32, 14, 384, 3), (32, 14, 768, 7),  # then kernels of 15 and 31 and a wide C
    (64, 14, 768, 15), (32, 14, 768, 31), (8, 16, 4096, 31)]


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def inputs(B, H, C, k):
    torch.manual_seed(0)
    x = torch.randn(B, 1 + H * H, C)
    w = torch.randn(C, 1, k, k) / k
    return x, w, torch.randn(x.shape)


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_child(B, H, C, k, budget):
    """Run in a fresh process: the MiB the backward adds to the resident size at its peak."""
    x, w, g = inputs(B, H, C, k)
    os.environ["CPVT_CPU_PARTIALS_BYTES"] = budget
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    torch.ops.cpvt.peg_backward(g, x, w, H, H, 1, [True, True, True])
    print((status_kib("VmHWM") - before) / 1024)


def main():
    torch.set_num_threads(2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"commit {commit} | float32, P=1, backward of all three gradients | medians of "
          f"{ROUNDS} rounds, settings alternating by round")
    print("| B | HxW | C | k | partials, all chunks | waves (default) | all chunks | "
          "x faster | peak +MiB waves | peak +MiB all | eager backward |")
    print("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for B, H, C, k in SHAPES:
        x, w, g = inputs(B, H, C, k)
        calls = 2 if k == 31 else 10
        times = {name: [] for name in SETTINGS}
        first = None
        for _ in range(ROUNDS):
            for name, budget in SETTINGS.items():
                os.environ["CPVT_CPU_PARTIALS_BYTES"] = budget
                got = torch.ops.cpvt.peg_backward(g, x, w, H, H, 1, [True, True, True])
                if first is None:
                    first = got
                assert all(torch.equal(a, b) for a, b in zip(first, got)), "bits differ"
                ts = []
                for _ in range(calls):
                    t = time.perf_counter()
                    torch.ops.cpvt.peg_backward(g, x, w, H, H, 1, [True, True, True])
                    ts.append(time.perf_counter() - t)
                times[name].append(min(ts))
        peg = ck.PEG(C, k)
        with torch.no_grad():
            peg.proj.weight.copy_(w)
        eager = []
        for _ in range(3):
            xg = x.clone().requires_grad_()
            y = peg(xg, (H, H))
            t = time.perf_counter()
            y.backward(g)
            eager.append(time.perf_counter() - t)
        peaks = {}
        for name, budget in SETTINGS.items():
            out = subprocess.run([sys.executable, __file__, "--peak", str(B), str(H), str(C),
                                  str(k), budget], capture_output=True, text=True, check=True)
            peaks[name] = float(out.stdout)
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        rows = min(B * H, 128)
        partials = rows * (k * k + 1) * C * 4 / 2**20
        print(f"| {B} | {H}x{H} | {C} | {k} | {partials:.0f} MiB | {med['waves (default)']:.1f} ms "
              f"| {med['all chunks']:.1f} ms | {med['all chunks'] / med['waves (default)']:.2f} "
              f"| {peaks['waves (default)']:.0f} | {peaks['all chunks']:.0f} | "
              f"{min(eager) * 1e3:.1f} ms |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        B, H, C, k = map(int, sys.argv[2:6])
        peak_child(B, H, C, k, sys.argv[6])
    else:
        main()
