"""Each bad-input case of tests/test_cuda.py::test_bad_inputs_raise alone, printed before it runs,
so that a crash names its case."""
import sys
import faulthandler
import torch
faulthandler.enable()
sys.path.insert(0, ".")
import cpvt_kernels as ck  # noqa: E402,F401

dev = "cuda"
B, P, H, W, C = 2, 1, 4, 5, 8
x = torch.randn(B, P + H * W, C, device=dev)
w = torch.randn(C, 1, 3, 3, device=dev)
b = torch.randn(C, device=dev)
op = torch.ops.cpvt.peg_forward
cases = [
    ("3-D", (x[0], w, b, H, W, P)),
    ("shape1", (x, w, b, H, W + 1, P)),
    ("H0", (x, w, b, 0, W, P)),
    ("P-1", (x, w, b, H, W, -1)),
    ("wshape", (x, w[:-1], b, H, W, P)),
    ("even k", (x, torch.randn(C, 1, 2, 3, device=dev), b, H, W, P)),
    ("k33", (x, torch.randn(C, 1, 33, 33, device=dev), b, H, W, P)),
    ("bshape", (x, w, b[:-1], H, W, P)),
    ("wdtype", (x, w.double(), b, H, W, P)),
    ("bdtype", (x, w, b.double(), H, W, P)),
    ("int", (x.int(), w.int(), None, H, W, P)),
    ("wcpu", (x, w.cpu(), b, H, W, P)),
    ("bcpu", (x, w, b.cpu(), H, W, P)),
]
which = sys.argv[1:] or [c[0] for c in cases]
for name, args in cases:
    if name not in which:
        continue
    print("case", name, flush=True)
    try:
        op(*args)
        print("  no error!", flush=True)
    except Exception as e:  # noqa: BLE001
        print("  ", type(e).__name__, str(e).splitlines()[0][:120], flush=True)
g = torch.randn_like(x)
for name, args in [("gshape", (g[:, :-1],)), ("gdtype", (g.double(),)), ("gcpu", (g.cpu(),))]:
    print("case", name, flush=True)
    try:
        torch.ops.cpvt.peg_backward(args[0], x, w, H, W, P, [True, True, True])
        print("  no error!", flush=True)
    except Exception as e:  # noqa: BLE001
        print("  ", type(e).__name__, str(e).splitlines()[0][:120], flush=True)
print("diag done", flush=True)
