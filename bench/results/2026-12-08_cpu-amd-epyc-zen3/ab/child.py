# One setting's times for ../../2026-12-07_cpu-amd-epyc-zen3/ab/ab.py (AB_CHILD=this file):
# python child.py THREADS PASS B:C:HW:k:dtype ... prints {shape: [fastest, median] ms} over 1.5 s
# of calls per shape. PASS: fwd; fwdbwd (torch.autograd.grad, no gradient accumulation); the raw
# peg_backward with every gradient (bwd), grad_x alone (gx), the weight and bias gradients alone
# (gw); a "flush" suffix copies 64 MB before each timed call.
import json, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import bench_peg as bp  # noqa: E402


def inputs(shape: str):
    """x, weight, bias, grad_out for "B:C:HW:k:dtype" (P = 1), the same draws in every process."""
    B, C, HW, k, dt = shape.split(":")
    B, C, HW, k = int(B), int(C), int(HW), int(k)
    gen = torch.Generator().manual_seed(0)
    draw = lambda *size: torch.randn(*size, generator=gen).to(getattr(torch, dt))  # noqa: E731
    x = draw(B, 1 + HW * HW, C)
    return x, draw(C, 1, k, k), draw(C), draw(*x.shape), HW


def main():
    import cpvt_kernels as ck
    bp.keep_freed_memory()
    threads, pass_name = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    bw = torch.ops.cpvt.peg_backward.default
    flush = pass_name.endswith("flush")
    pass_name = pass_name.removesuffix("flush")
    fa = torch.empty(16 * 2**20); fb = torch.empty_like(fa)
    masks = {"bwd": [True] * 3, "gx": [True, False, False], "gw": [False, True, True]}
    res = {}
    for shape in sys.argv[3:]:
        x, w, b, go, HW = inputs(shape)
        if pass_name == "fwd":
            f = lambda: ck.fused_peg(x, w, b, size=(HW, HW), backend="cpu")  # noqa: E731
        elif pass_name in masks:
            f = lambda m=masks[pass_name]: bw(go, x, w, HW, HW, 1, m)  # noqa: E731
        else:
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))

            def f():
                y = ck.fused_peg(xr, wr, br, size=(HW, HW), backend="cpu")
                torch.autograd.grad(y, (xr, wr, br), go)
        for _ in range(3):
            f()
        ts = []
        t_end = time.perf_counter() + 1.5
        while time.perf_counter() < t_end or len(ts) < 10:
            if flush:
                fb.copy_(fa)
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        ts.sort()
        B, C, HW_, k, dt = shape.split(":")
        res[f"{B}x{C}x{HW_} k{k} {dt}"] = (ts[0] * 1e3, ts[len(ts) // 2] * 1e3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
