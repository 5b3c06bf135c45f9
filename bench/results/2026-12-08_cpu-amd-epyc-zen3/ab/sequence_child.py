# The forward (F) and the full backward (Bk) of the cpu op, each timed right after the other or
# after a 32 MB copy, for ../../2026-12-07_cpu-amd-epyc-zen3/ab/ab.py (AB_CHILD=this file, PASS
# ignored): prints {"<shape> <which>": [fastest, median] ms} over 150 calls.
import json, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from child import bp, inputs  # noqa: E402


def main():
    bp.keep_freed_memory()
    torch.set_num_threads(int(sys.argv[1]))
    fw, bw = torch.ops.cpvt.peg_forward.default, torch.ops.cpvt.peg_backward.default
    a = torch.randn(8 * 2**20); c = torch.empty_like(a)
    res = {}
    for shape in sys.argv[3:]:
        x, w, b, g, HW = inputs(shape)
        F = lambda: fw(x, w, b, HW, HW, 1)  # noqa: E731
        Bk = lambda: bw(g, x, w, HW, HW, 1, [True, True, True])  # noqa: E731
        evict = lambda: c.copy_(a)  # noqa: E731
        for name, before, timed in (("F after evict", evict, F), ("F after Bk", Bk, F),
                                    ("Bk after F", F, Bk), ("Bk after evict", evict, Bk)):
            ts = []
            for i in range(160):
                before()
                t = time.perf_counter(); timed(); dt = time.perf_counter() - t
                if i >= 10:
                    ts.append(dt)
            ts.sort()
            res[f"{shape} {name}"] = (ts[0] * 1e3, ts[len(ts) // 2] * 1e3)
    print(json.dumps(res))


if __name__ == "__main__":
    import cpvt_kernels  # noqa: F401  (registers torch.ops.cpvt)
    main()
