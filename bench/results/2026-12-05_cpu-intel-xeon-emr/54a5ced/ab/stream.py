# Non-temporal (streaming) stores of the float32 forward against cached stores, by output size,
# alternating in one process through CPVT_CPU_STREAM_BYTES (0: stream at every size; 1e12:
# never): the op alone, and the op followed by out.sum() (a consumer that reads the output, as
# the next layer of a model does). C=192, P=1, k=3, 14x14, 2 threads, glibc keeps freed memory.
import os, statistics
import torch
from rounds import round_ms

H = 14
for consume in (False, True):
    for B in (8, 16, 32, 64, 128):
        x = torch.randn(B, 1 + H * H, 192)
        w, b = torch.randn(192, 1, 3, 3), torch.randn(192)
        op = lambda: torch.ops.cpvt.peg_forward(x, w, b, H, H, 1)
        f = (lambda: op().sum()) if consume else op
        res = {"cached": [], "stream": []}
        for _ in range(8):
            for name, val in (("cached", "1000000000000"), ("stream", "0")):
                os.environ["CPVT_CPU_STREAM_BYTES"] = val
                res[name].append(round_ms(f, 3, max(10, 400 // B)))
        a, s_ = statistics.median(res["cached"]), statistics.median(res["stream"])
        print(f"B={B:3d} out {x.nbytes / 2**20:5.1f} MiB {'op + sum' if consume else 'op alone'}: "
              f"cached {a:.4f} ms  stream {s_:.4f} ms  cached/stream {a / s_:.2f}")
