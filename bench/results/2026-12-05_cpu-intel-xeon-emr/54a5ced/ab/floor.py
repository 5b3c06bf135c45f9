# The fused forward against copies of the same bytes, in one process, round by round: eager PEG,
# the cpu op (torch.ops.cpvt.peg_forward), x.clone(), out.copy_(x) and torch.neg(x, out=out)
# (a copy with vector stores into a preallocated tensor). B=32, C=192, P=1, k=3, 2 threads,
# median of per-call times in each round, then the median and minimum over rounds.
import statistics, sys
import torch
from cpvt_kernels import PEG
from rounds import round_ms

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
for dt in (torch.float32, torch.bfloat16):
    for H in (14, 24):
        x = torch.randn(32, 1 + H * H, 192, dtype=dt)
        peg = PEG(192, 3).to(dt)
        w, b = peg.proj.weight.detach(), peg.proj.bias.detach()
        out = torch.empty_like(x)
        cases = {
            "eager": lambda: peg(x, H, H),
            "op": lambda: torch.ops.cpvt.peg_forward(x, w, b, H, H, 1),
            "clone": lambda: x.clone(),
            "copy_": lambda: out.copy_(x),
            "neg": lambda: torch.neg(x, out=out),
        }
        res = {k: [] for k in cases}
        with torch.no_grad():
            for _ in range(rounds):
                for k, f in cases.items():
                    res[k].append(round_ms(f, 5, 40))
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"{str(dt)[6:]} {H}x{H}: " + "  ".join(
            f"{k} {med[k]:.4f} (min {min(res[k]):.4f})" for k in cases))
        print(f"    eager/op {med['eager'] / med['op']:.2f}  eager/clone {med['eager'] / med['clone']:.2f}"
              f"  eager/copy_ {med['eager'] / med['copy_']:.2f}  op/clone {med['op'] / med['clone']:.2f}"
              f"  op/copy_ {med['op'] / med['copy_']:.2f}  bar (eager/5) {med['eager'] / 5:.4f} ms")
