"""A model of the row rings of bench/cuda_micro/peg_pipe.cuh: one block's positions, its NS
buffers and its cp.async commit groups, with every group landing as late as
cp.async.wait_group allows (or at once). It asserts that each step reads the position it wants
and that no refill hits a buffer whose position is still to be read.

Forward: the prologue issues positions 0 .. NS - 2; step q waits for position q (NS - 2 groups
may be pending), then issues position q + NS - 1 into buffer (q - 1) % NS and reads buffer
q % NS. Backward: the prologue issues 0 .. NS - 3; step q waits for q (NS - 3 pending), issues
q + NS - 2 into buffer (q - 2) % NS, reads grad_out at q and, from the item's second position on,
x at q - 1.

    python pipe_schedule.py
"""


def run(H, NS, items, late, backward):
    R = H + (3 if backward else 2)  # positions an item
    positions = items * R
    ahead = NS - 2 if backward else NS - 1  # positions issued before step 0
    buf = [None] * NS
    pending = []
    iq = 0

    def land(n):
        for _ in range(n):
            g = pending.pop(0)
            if g is not None:
                buf[g[0]] = g[1]

    def issue():
        nonlocal iq
        pending.append((iq % NS, iq) if iq < positions else None)
        iq += 1
        if not late:
            land(len(pending))

    for _ in range(ahead):
        issue()
    for q in range(positions):
        while len(pending) > ahead - 1:  # cp.async.wait_group(ahead - 1)
            land(1)
        held = buf[(q + ahead) % NS]  # the buffer the refill goes to
        oldest_needed = q - 1 if backward else q
        assert held is None or held < oldest_needed, (H, NS, items, late, q, held)
        issue()
        assert buf[q % NS] == q, (H, NS, items, late, q, buf)
        if backward and q % R >= 1:
            assert buf[(q - 1) % NS] == q - 1, (H, NS, items, late, q, buf)
    land(len(pending))


for backward in (False, True):
    for H in (1, 2, 3, 14, 24):
        for NS in ((4, 6, 8) if backward else (3, 4, 6, 8)):
            for items in (1, 2, 5):
                for late in (True, False):
                    run(H, NS, items, late, backward)
    print(("backward" if backward else "forward") + ": every step reads its rows; no refill "
          "hits a row still to be read (H 1-24, NS %s, 1-5 items, copies landing late or at "
          "once)" % ("4-8" if backward else "3-8"))
