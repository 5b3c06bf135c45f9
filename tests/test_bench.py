"""Smoke tests of the benchmark programs (bench/) and of ``python -m cpvt_kernels.selfcheck``.

They run the programs' ``main`` with tiny shapes: the point is that every path writes complete
rows and that a wrong backend is reported, not the timings.
"""
import csv
import functools
import glob
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpvt_kernels as ck
import cpvt_kernels.modules
from cpvt_kernels import selfcheck
from conftest import HAS_GPU, require_backend

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_peg  # noqa: E402

META = ("date", "device", "device_type", "torch", "triton", "python", "commit")
TINY = ["--shapes", "2x8x5", "3x5x4x6", "--kernel-sizes", "3,7", "--min-time", "0.005",
        "--min-reps", "3", "--no-plot"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_peg_tiny_run_writes_every_row(tmp_path, capsys):
    require_backend("cpu")
    rc = bench_peg.main(TINY + ["--device", "cpu", "--dtypes", "float32", "bfloat16",
                                "--passes", "fwd,bwd,fwdbwd", "--impls", "eager", "cpu",
                                "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "peg.csv")
    # 2 shapes x 2 kernel sizes x 2 dtypes x 3 passes x 2 implementations
    assert len(rows) == 2 * 2 * 2 * 3 * 2
    assert set(rows[0]) == set(bench_peg.CSV_FIELDS)
    for r in rows:
        assert r["status"] == "ok", r
        for col in META:
            assert r[col], (col, r)
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["median_ms"]) \
            <= float(r["p80_ms"])
        assert int(r["reps"]) >= 3
        n = int(r["B"]) * (int(r["P"]) + int(r["H"]) * int(r["W"])) * int(r["C"])
        itemsize = 4 if r["dtype"] == "fp32" else 2
        assert int(r["bytes"]) == bench_peg.PASS_BYTES[r["pass"]] * n * itemsize
        gbps = int(r["bytes"]) / (float(r["median_ms"]) * 1e-3) / 1e9
        assert float(r["gbps"]) == pytest.approx(gbps, rel=1e-3)
        assert float(r["frac_copy"]) == pytest.approx(gbps / float(r["copy_gbps"]), rel=1e-2)
        if r["impl"] == "eager":
            assert float(r["speedup_vs_eager"]) == 1.0
        assert float(r["max_rel_err"]) <= bench_peg.TOLERANCE[bench_peg.DTYPE_NAMES[r["dtype"]]]
        assert float(r["faults_per_call"]) >= 0
        assert r["frac_size_copy"] == ""  # no copy was timed
    assert {r["impl"] for r in rows} == {"eager", "cpu"}
    assert {(r["B"], r["C"], r["H"], r["W"]) for r in rows} == {("2", "8", "5", "5"),
                                                                  ("3", "5", "4", "6")}
    md = (tmp_path / "peg.md").read_text()
    assert md.count("\n| fwdbwd |") == 2 * 2 * 2 * 2
    assert "copy bandwidth" in md and "## Summary" in md and "page faults" in md
    if platform.libc_ver()[0] == "glibc":
        assert "allocator: glibc malloc keeps freed memory" in md
    out = capsys.readouterr().out
    assert "[48/48]" in out and "| impl | pass | dtype |" in out


def test_bench_peg_copy_of_the_same_tokens(tmp_path):
    """The copy baseline: x.clone() timed in the forward only, and every row's GB/s also given as
    a fraction of the copy's at the same shape and dtype."""
    require_backend("cpu")
    rc = bench_peg.main(TINY + ["--device", "cpu", "--dtypes", "float32", "--passes",
                                "fwd,bwd,fwdbwd", "--impls", "eager", "copy", "cpu",
                                "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "peg.csv")
    # 2 shapes x 2 kernel sizes: eager and cpu in 3 passes, the copy in the forward
    assert len(rows) == 2 * 2 * (2 * 3 + 1)
    copies = {(r["B"], r["C"], r["H"], r["W"], r["k"]): r for r in rows if r["impl"] == "copy"}
    assert len(copies) == 4 and {r["pass"] for r in copies.values()} == {"fwd"}
    for r in rows:
        assert r["status"] == "ok", r
        c = copies[(r["B"], r["C"], r["H"], r["W"], r["k"])]
        assert float(r["frac_size_copy"]) == pytest.approx(float(r["gbps"]) / float(c["gbps"]),
                                                           rel=1e-3)
        if r["impl"] == "copy":
            eager = next(e for e in rows if e["impl"] == "eager" and e["pass"] == "fwd"
                         and all(e[k] == r[k] for k in ("B", "C", "H", "W", "k")))
            assert r["max_rel_err"] == "" and r["bytes"] == eager["bytes"]
            assert float(r["speedup_vs_eager"]) == pytest.approx(
                float(eager["median_ms"]) / float(r["median_ms"]), rel=1e-3)
    md = (tmp_path / "peg.md").read_text()
    assert "% size copy" in md and "| fwd | fp32 | 2x8x5 P1 k3 | copy |" in md
    assert "| fwdbwd | fp32 | 2x8x5 P1 k3 | copy |" not in md


def test_bench_peg_alternates_the_implementations_in_rounds(tmp_path, monkeypatch):
    """Each implementation's samples come in --rounds rounds, interleaved with the others', each
    round starting one implementation later, and every sample counts in the row's reps."""
    require_backend("cpu")
    calls = []
    make_pass = bench_peg.make_pass
    sample = bench_peg.Timer.sample

    def tagged_pass(pass_name, m, *args):
        fn = make_pass(pass_name, m, *args)
        fn.impl = type(m).__name__
        return fn

    def recorded_sample(self, fn, reps, per_call, warm=False):
        calls.append((getattr(fn, "impl", None), reps))
        assert warm or getattr(fn, "impl", None) is None
        return sample(self, fn, reps, per_call, warm)

    monkeypatch.setattr(bench_peg, "make_pass", tagged_pass)
    monkeypatch.setattr(bench_peg.Timer, "sample", recorded_sample)
    rc = bench_peg.main(["--shapes", "2x8x5", "--min-time", "0.002", "--min-reps", "7",
                         "--rounds", "3", "--no-plot", "--device", "cpu", "--dtypes", "float32",
                         "--passes", "fwd", "--impls", "eager", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    # (the copy bandwidth is timed in one block) 3 rounds of the two implementations
    calls = [c for c in calls if c[0] is not None]
    assert [c[0] for c in calls] == ["PEG", "FusedPEG", "FusedPEG", "PEG", "PEG", "FusedPEG"]
    rows = {r["impl"]: r for r in _rows(tmp_path / "peg.csv")}
    for impl, name in (("PEG", "eager"), ("FusedPEG", "cpu")):
        per_round = [n for i, n in calls if i == impl]
        assert len(per_round) == 3 and min(per_round) >= 2
        assert max(per_round) - min(per_round) <= 1
        assert int(rows[name]["reps"]) == sum(per_round) >= 7
    with pytest.raises(SystemExit, match="--rounds"):
        bench_peg.main(["--rounds", "0"])


def test_bench_peg_estimates_the_time_left_once_per_block(tmp_path, capsys):
    """The implementations of a pass are timed together and printed after it: each row of the
    block shows the same estimate (the first row's used to count the whole block's time as its
    own, overestimating the run many times over), the rows count 1..total, and the last says 0."""
    require_backend("cpu")
    rc = bench_peg.main(["--shapes", "2x8x5", "--min-time", "0.2", "--no-plot",
                         "--device", "cpu", "--dtypes", "float32", "--passes", "fwd,fwdbwd",
                         "--impls", "eager", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    rows = re.findall(r"^\[(\d+)/(\d+)\] (\w+) .*\[eta (\d+) s\]$", capsys.readouterr().out,
                      re.MULTILINE)
    assert [(int(i), int(n), p) for i, n, p, _ in rows] == [
        (1, 4, "fwd"), (2, 4, "fwd"), (3, 4, "fwdbwd"), (4, 4, "fwdbwd")]
    etas = [int(e) for *_, e in rows]
    assert etas[0] == etas[1] and etas[2] == etas[3] == 0


@pytest.mark.parametrize("argv, flag", [
    (["--shapes", "2x8x5", "--kernel-sizes", "4"], "--kernel-sizes"),
    (["--shapes", "2x8x5", "--kernel-sizes", "33"], "--kernel-sizes"),
    (["--shapes", "2x8x5", "--prefix-tokens", "-1"], "--prefix-tokens"),
    (["--shapes", "2x8x5", "--prefix-tokens", "one"], "--prefix-tokens"),
    (["--kernel-sizes", "3"], "--kernel-sizes"),          # without --shapes
    (["--shapes", "0x8x5"], "--shapes"),
    (["--threads", "0"], "--threads"),
    (["--min-reps", "0"], "--min-reps"),
    (["--min-time", "0"], "--min-time"),
])
def test_bench_peg_bad_arguments_name_their_flag(tmp_path, argv, flag):
    """Checked before anything is measured, with a message naming the flag."""
    with pytest.raises(SystemExit, match=flag):
        bench_peg.main(argv + ["--out", str(tmp_path)])
    assert not (tmp_path / "peg.csv").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--batch", "0"], "--batch"), (["--sizes", "20"], "--sizes"), (["--sizes", "x"], "--sizes"),
    (["--peg-positions", "12"], "--peg-positions"), (["--threads", "0"], "--threads"),
    (["--rounds", "0"], "--rounds"),
])
def test_bench_model_bad_arguments_name_their_flag(tmp_path, argv, flag):
    import bench_model
    with pytest.raises(SystemExit, match=flag):
        bench_model.main(argv + ["--device", "cpu", "--out", str(tmp_path)])
    assert not (tmp_path / "model.csv").exists()


def test_plot_and_goals_usage(tmp_path, capsys):
    import goals
    import plot
    assert plot.main(["--help"]) == 0 and "usage" in capsys.readouterr().out
    assert plot.main([str(tmp_path / "missing.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        goals.main([str(tmp_path / "missing.csv")])
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_peg_quick_mode_with_compile(tmp_path):
    """--quick's implementation set (eager, torch.compile, cpu) on one tiny shape."""
    require_backend("cpu")
    rc = bench_peg.main(["--quick", "--shapes", "2x8x5", "--dtypes", "float32", "--passes",
                         "fwd,fwdbwd", "--min-time", "0.005", "--min-reps", "3", "--no-plot",
                         "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "peg.csv")
    assert [(r["pass"], r["impl"]) for r in rows] == [
        ("fwd", "eager"), ("fwd", "compile"), ("fwd", "copy"), ("fwd", "cpu"),
        ("fwdbwd", "eager"), ("fwdbwd", "compile"), ("fwdbwd", "cpu")]
    assert all(r["status"] == "ok" and r["speedup_vs_compile"] for r in rows)


def test_bench_peg_reports_a_wrong_backend(tmp_path, monkeypatch, capsys):
    require_backend("cpu")
    real = cpvt_kernels.modules.fused_peg_hw

    def wrong(x, weight, bias, H, W, num_prefix_tokens=1, backend="auto"):
        return real(x, weight, bias, H, W, num_prefix_tokens, backend) * 1.01

    monkeypatch.setattr(cpvt_kernels.modules, "fused_peg_hw", wrong)
    rc = bench_peg.main(["--shapes", "2x8x5", "--dtypes", "float32", "--passes", "fwd",
                         "--impls", "eager", "cpu", "--min-time", "0.005", "--no-plot",
                         "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 1
    rows = {r["impl"]: r for r in _rows(tmp_path / "peg.csv")}
    assert rows["cpu"]["status"].startswith("parity failure") and rows["cpu"]["median_ms"] == ""
    assert rows["eager"]["status"] == "ok"
    assert "PARITY FAILURE: cpu" in capsys.readouterr().err


def test_bench_peg_warns_at_the_start_without_a_fused_backend(tmp_path, monkeypatch, capsys):
    """A run with no fused backend (say, an extension built against another torch) says so
    before it times anything, not only in the notes at the end, and names why."""
    monkeypatch.setattr(bench_peg, "fused_backends", lambda device: [])
    monkeypatch.setattr(cpvt_kernels.ops, "_unavailable_reason",
                        lambda b, device_type: f"{b} is out for this test")
    timed = []
    real_sample = bench_peg.Timer.sample

    def sample(self, *args, **kwargs):
        timed.append(capsys.readouterr().err)
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(bench_peg.Timer, "sample", sample)
    rc = bench_peg.main(["--shapes", "2x8x5", "--dtypes", "float32", "--passes", "fwd",
                         "--min-time", "0.005", "--no-plot", "--device", "cpu",
                         "--out", str(tmp_path)])
    assert rc == 0 and timed
    assert "warning: no fused backend is available on this device: " in timed[0]
    assert "cpu: cpu is out for this test" in timed[0]
    assert {r["impl"] for r in _rows(tmp_path / "peg.csv")} == {"eager", "compile", "copy"}


def test_bench_peg_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    rows = [dict(device="d", torch="t", commit="c", copy_gbps="10", **{"pass": p}, dtype=dt,
                 B=2, C=8, H=5, W=5, P=1, k=3, impl=i, gbps=str(g))
            for p in ("fwd", "fwdbwd") for dt in ("fp32", "bf16")
            for i, g in (("eager", 1.0), ("cpu", 5.0))]
    png = plot.plot_peg(rows, tmp_path / "peg.png")
    assert png is not None and png.stat().st_size > 10_000


def test_bench_peg_helpers():
    assert bench_peg.parse_shape("32x192x14", [0, 1], [3]) == [
        bench_peg.Case(32, 192, 14, 14, 0, 3), bench_peg.Case(32, 192, 14, 14, 1, 3)]
    assert bench_peg.parse_shape("2x3x4x5", [1], [7]) == [bench_peg.Case(2, 3, 4, 5, 1, 7)]
    with pytest.raises(Exception, match="BxCxH"):
        bench_peg.parse_shape("32,192,14", [1], [3])
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert bench_peg.percentile(sorted(values), q) == pytest.approx(
            torch.quantile(torch.tensor(values, dtype=torch.float64), q).item())
    assert bench_peg.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    for flush in (False, True):
        timer = bench_peg.Timer(torch.device("cpu"), min_time=0.02, min_reps=5, flush_cache=flush)
        assert (timer.flush is not None) == flush
        if flush:
            assert timer.flush.nbytes >= max(64 * 2**20, 2 * (bench_peg.last_level_cache_bytes()
                                                                or 0))
        stats = timer(lambda: __import__("time").sleep(0.002))
        assert stats.reps >= 5 and stats.median_ms >= 2.0
        assert stats.p20_ms <= stats.median_ms <= stats.p80_ms


def test_bench_peg_variants_set_their_environment(monkeypatch):
    """cuda-stream, cuda-tile and cuda-pipe are the cuda backend timed with CPVT_CUDA_KERNELS
    stream, tile and pipe, restored after."""
    for variant in ("cuda-stream", "cuda-tile", "cuda-pipe"):
        assert variant not in bench_peg.fused_backends(torch.device("cpu"))
    monkeypatch.delenv("CPVT_CUDA_KERNELS", raising=False)
    with bench_peg.impl_env("cuda-tile"):
        assert "CPVT_CUDA_KERNELS" in os.environ and os.environ["CPVT_CUDA_KERNELS"] == "tile"
    assert "CPVT_CUDA_KERNELS" not in os.environ
    monkeypatch.setenv("CPVT_CUDA_KERNELS", "tile")
    with bench_peg.impl_env("cuda-stream"):
        assert os.environ["CPVT_CUDA_KERNELS"] == "stream"
    assert os.environ["CPVT_CUDA_KERNELS"] == "tile"
    with bench_peg.impl_env("cuda-pipe"):
        assert os.environ["CPVT_CUDA_KERNELS"] == "pipe"
    monkeypatch.delenv("CPVT_CUDA_KERNELS")
    with bench_peg.impl_env("cuda-stream"):
        pass
    assert "CPVT_CUDA_KERNELS" not in os.environ
    with bench_peg.impl_env("cpu"):  # not a variant: nothing set
        assert "CPVT_CUDA_KERNELS" not in os.environ


def _goal_rows(device_type, rng, cell=None, exact=False):
    """A run's rows for bench/goals.py: every goal of ``device_type`` met by a random margin
    (``exact``: met exactly), except ``cell`` = (goal index, shape index, value), whose last
    dtype's row gets that value."""
    import goals
    rows = []
    for gi, g in enumerate(goals.GOALS[device_type]):
        for si, (b, c, h) in enumerate(g.shapes):
            for dt in g.dtypes:
                v = g.least if exact else max(g.least, 0.1) * (1.0 + float(rng.uniform(0.01, 0.5)))
                if cell is not None and cell[:2] == (gi, si) and dt == g.dtypes[-1]:
                    v = cell[2]
                ms = float(rng.uniform(0.01, 1.0))
                # cuda's rows come with triton's, at cuda's goal, above triton's own
                impls = [(g.impl, v)] + ([("triton", g.least)] if g.impl == "cuda" else [])
                for impl, val in impls:
                    r = dict.fromkeys(bench_peg.CSV_FIELDS, "")
                    r.update({"date": "2026-12-06", "device": "dev", "device_type": device_type,
                              "commit": "abc", "pass": g.pas, "dtype": dt, "B": b, "C": c,
                              "H": h, "W": h, "P": 1, "k": g.k, "impl": impl, "status": "ok",
                              # triton (2-3 ms) slower than cuda (0.01-1 ms)
                              "median_ms": ms if impl == "cuda" else ms + 2.0,
                              g.col: val})
                    rows.append(r)
    return rows


def _write_rows(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench_peg.CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_goals_report_met_and_missed(tmp_path, device_type):
    import io
    import numpy as np
    import goals
    rng = np.random.default_rng()
    met = _write_rows(tmp_path / "met.csv", _goal_rows(device_type, rng))
    out = io.StringIO()
    assert goals.report(met, out)
    assert "every goal met" in out.getvalue() and "*" not in out.getvalue()
    # each cell in turn just under its goal (in its last dtype's row): that goal's line, and
    # the run, miss
    for gi, g in enumerate(goals.GOALS[device_type]):
        if g.shown_only:
            continue
        for si, shape in enumerate(g.shapes):
            missed = _write_rows(tmp_path / f"missed{gi}_{si}.csv",
                                 _goal_rows(device_type, rng, (gi, si, g.least * 0.999)))
            out = io.StringIO()
            assert not goals.report(missed, out)
            text = out.getvalue().splitlines()
            line = [ln for ln in text if ln.startswith(f"| {g.issue} | {g.text} |")]
            assert len(line) == 1 and line[0].endswith("| no |")
            assert line[0].split(" | ")[-2].split(" / ")[si].endswith("*")
            assert sum(ln.endswith("| no |") for ln in text) == 1
            # a row the run lacks is a miss, shown as '-'
            rows = [r for r in _goal_rows(device_type, rng)
                    if not (r["impl"] == g.impl and r["pass"] == g.pas and r["k"] == g.k
                            and (r["B"], r["C"], r["H"]) == shape)]
            out = io.StringIO()
            assert not goals.report(_write_rows(tmp_path / "lack.csv", rows), out)
            line = [ln for ln in out.getvalue().splitlines()
                    if ln.startswith(f"| {g.issue} | {g.text} |")]
            assert line[0].split(" | ")[-2].split(" / ")[si] == "-"
            # so is a goal of two dtypes whose second one's row failed: the first's value alone
            # does not meet it
            rows = _goal_rows(device_type, rng)
            for r in rows:
                if (r["impl"] == g.impl and r["pass"] == g.pas and r["k"] == g.k
                        and (r["B"], r["C"], r["H"]) == shape and r["dtype"] == g.dtypes[-1]):
                    r["status"] = "parity failure"
            out = io.StringIO()
            assert not goals.report(_write_rows(tmp_path / "failed.csv", rows), out)
            line = [ln for ln in out.getvalue().splitlines()
                    if ln.startswith(f"| {g.issue} | {g.text} |")]
            assert line[0].endswith("| no |")
            assert line[0].split(" | ")[-2].split(" / ")[si] == "-"
    assert goals.main([met, "--strict"]) == 0
    assert goals.main([met, missed, "--strict"]) == 1
    assert goals.main([met, missed]) == 0
    # "at least": a value equal to its goal meets it
    out = io.StringIO()
    assert goals.report(_write_rows(tmp_path / "exact.csv",
                                    _goal_rows(device_type, rng, exact=True)), out)
    assert "*" not in out.getvalue()
    # rows of other shapes (P = 0, a grid that is not square) far under the goals are not the
    # goals' rows
    rows = _goal_rows(device_type, rng)
    for change in (lambda r: {"P": 0}, lambda r: {"W": r["H"] + 1}):
        for r in list(rows):
            other = dict(r, **change(r))
            for col in ("speedup_vs_eager", "frac_copy", "frac_size_copy"):
                if other[col] != "":
                    other[col] = 0.01
            rows.append(other)
    out = io.StringIO()
    assert goals.report(_write_rows(tmp_path / "others.csv", rows), out), out.getvalue()
    # a value shown beside the goals, not one: without it the run still meets every goal
    for gi, g in enumerate(goals.GOALS[device_type]):
        if g.shown_only:
            out = io.StringIO()
            assert goals.report(_write_rows(tmp_path / "shown.csv", _goal_rows(
                device_type, rng, (gi, 0, ""))), out)
            line = [ln for ln in out.getvalue().splitlines() if f"| {g.text} |" in ln]
            assert len(line) == 1 and "(shown)" in line[0] and " - " in line[0]


def test_goals_cuda_slower_than_triton(tmp_path):
    import io
    import numpy as np
    import goals
    rows = _goal_rows("cuda", np.random.default_rng())
    slow = next(r for r in rows if r["impl"] == "cuda")
    slow["median_ms"] = 3.01  # triton's rows take 2-3 ms
    out = io.StringIO()
    assert not goals.report(_write_rows(tmp_path / "slow.csv", rows), out)
    line = next(ln for ln in out.getvalue().splitlines() if "as fast as triton" in ln)
    assert line.endswith("| no |") and f"{slow['C']}x" in line
    # a row triton ran and cuda failed is a miss too, not a row left out of the comparison
    rows = _goal_rows("cuda", np.random.default_rng())
    next(r for r in rows if r["impl"] == "cuda")["status"] = "error"
    out = io.StringIO()
    assert not goals.report(_write_rows(tmp_path / "failed.csv", rows), out)
    line = next(ln for ln in out.getvalue().splitlines() if "as fast as triton" in ln)
    assert line.endswith("| no |") and "1 of triton's without cuda" in line
    # a triton row that failed, with no time, is left out of the comparison
    rows = _goal_rows("cuda", np.random.default_rng())
    failed = dict(next(r for r in rows if r["impl"] == "triton"), status="error", median_ms="",
                  C=8)
    out = io.StringIO()
    assert goals.report(_write_rows(tmp_path / "triton_failed.csv", rows + [failed]), out)


def test_goals_note_a_cpu_run_with_other_than_2_threads(tmp_path):
    import io
    import numpy as np
    import goals
    rows = _goal_rows("cpu", np.random.default_rng())
    for threads, noted in (("2", False), ("16", True)):
        for r in rows:
            r["threads"] = threads
        out = io.StringIO()
        assert goals.report(_write_rows(tmp_path / "t.csv", rows), out)
        assert ("run with 16 threads" in out.getvalue()) == noted


def test_large_gpu_tests_take_turns_across_processes(tmp_path):
    """The lock behind conftest.large_gpu_memory: three processes (as xdist workers and the GPU
    suite's side-by-side test runs are) hold it one after another, never two at once."""
    tests = str(Path(__file__).resolve().parent)
    code = (f"import sys, time; sys.path.insert(0, {tests!r})\n"
            "from conftest import exclusive_among_processes\n"
            f"with exclusive_among_processes('turns.lock', {str(tmp_path)!r}):\n"
            "    t0 = time.time(); time.sleep(0.4); t1 = time.time()\n"
            "print(t0, t1)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    spans = sorted(tuple(map(float, p.communicate(timeout=120)[0].split())) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans


def test_pick_device_gives_cuda_an_index(monkeypatch):
    """torch.cuda.set_device rejects a bare "cuda" device in some releases (2.11): the bench
    programs resolve it to the current device's index."""
    assert bench_peg.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert bench_peg.pick_device("cuda") == torch.device("cuda", 3)
    assert bench_peg.pick_device(None) == torch.device("cuda", 3)
    assert bench_peg.pick_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.skipif(not HAS_GPU, reason="GPU-only: no CUDA device")
def test_gpu_timer_measures_device_time_apart_from_host_time():
    """A call that only spends host time measures as almost no device time (its kernels are
    queued behind the spin), and its host time is reported apart."""
    import time
    timer = bench_peg.Timer(torch.device("cuda"), min_time=0.02, min_reps=5, flush_cache=True)
    x = torch.randn(1024, device="cuda")

    def host_bound():
        time.sleep(0.001)
        x.add_(1.0)

    stats = timer(host_bound)
    assert stats.host_ms >= 1.0
    assert stats.median_ms < 0.5


_ALLOC_LOOP = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import bench_peg
import ctypes
# Memory goes back to the system on every free, as glibc's defaults do depending on the heap.
mallopt = ctypes.CDLL(None).mallopt
assert mallopt(-3, 128 * 1024) and mallopt(-1, 128 * 1024)  # mmap and trim thresholds
if sys.argv[2] == "keep":
    assert bench_peg.keep_freed_memory() is None
n = 6 * 2**20 // 4
for _ in range(3):  # warm up
    a, b = torch.empty(n).fill_(1.0), torch.empty(n).fill_(2.0)
    del a, b
per_pass = []
for _ in range(20):
    f0 = bench_peg.minor_faults()
    a, b = torch.empty(n).fill_(1.0), torch.empty(n).fill_(2.0)
    del a, b
    per_pass.append(bench_peg.minor_faults() - f0)
print(" ".join(map(str, per_pass)))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="--keep-freed-memory sets glibc malloc options")
def test_keep_freed_memory_stops_page_faults():
    """Two 6 MiB tensors allocated, written and freed in a loop: with the benchmarks' allocator
    setting the loop reuses the memory (no page faults); where glibc gives freed memory back to
    the system, as its defaults do depending on the heap's state, every pass faults.

    With the setting a pass or two may still fault once (1536 or 3072 faults, one or both
    tensors' pages, in about one process of ten on a 2-core EPYC): a small block that another part
    of the runtime allocates while the loop's memory is free can split it, and the heap grows once
    (the tensors' addresses move past the old ones). That is growth, not memory going back to the
    system; what must hold is that the loop does not keep faulting."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _ALLOC_LOOP, str(BENCH), mode],
                             capture_output=True, text=True, check=True)
        return [int(f) for f in out.stdout.strip().splitlines()[-1].split()]
    kept = faults("keep")
    assert len(kept) == 20 and sum(f > 0 for f in kept) <= 2, kept
    returned = faults("return")
    # 12 MiB of pages per pass; shows that the loop can see the faults it is meant to count.
    assert min(returned) > 1000, returned


def test_bench_model_tiny_run(tmp_path):
    require_backend("cpu")
    import bench_model
    rc = bench_model.main(["--quick", "--device", "cpu", "--sizes", "32,48", "--batch", "2",
                           "--min-time", "0.005", "--min-reps", "2", "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "model.csv")
    assert [(r["img"], r["mode"], r["impl"]) for r in rows] == [
        (s, m, i) for s in ("32", "48") for m in ("infer", "train") for i in ("eager", "fused")]
    for r in rows:
        assert r["status"] == "ok" and float(r["images_per_s"]) > 0 and r["commit"]
        assert r["backend"] == ("cpu" if r["impl"] == "fused" else "eager")
        assert float(r["faults_per_call"]) >= 0
    assert all(float(r["max_rel_err"]) < 1e-3 for r in rows
               if r["mode"] == "infer" and r["impl"] == "fused")
    assert "images/s" in (tmp_path / "model.md").read_text()


def test_bench_model_alternates_the_models_in_rounds(tmp_path, monkeypatch):
    """The eager and the fused model's samples are taken in rounds that alternate between them,
    each round starting with the other model, and each row pools all its rounds' samples."""
    require_backend("cpu")
    import bench_model
    sampled, calibrated = [], []

    class Recording(bench_model.Timer):
        def calibrate(self, fn):
            calibrated.append(fn)
            return 6, 1e-3  # 6 samples: 2 in each of 3 rounds

        def sample(self, fn, reps, per_call, warm=False):
            sampled.append((calibrated.index(fn), reps, warm))
            return super().sample(fn, reps, per_call, warm)

    monkeypatch.setattr(bench_model, "Timer", Recording)
    rc = bench_model.main(["--quick", "--device", "cpu", "--sizes", "32", "--batch", "2",
                           "--modes", "train", "--rounds", "3", "--out", str(tmp_path)])
    assert rc == 0
    assert sampled == [(0, 2, True), (1, 2, True), (1, 2, True), (0, 2, True), (0, 2, True),
                       (1, 2, True)]
    rows = _rows(tmp_path / "model.csv")
    assert [(r["impl"], r["reps"]) for r in rows] == [("eager", "6"), ("fused", "6")]
    assert float(rows[1]["speedup_vs_eager"]) == pytest.approx(
        float(rows[0]["median_ms"]) / float(rows[1]["median_ms"]), rel=1e-3)
    assert "3 rounds alternating" in (tmp_path / "model.md").read_text()


def test_selfcheck_passes_on_cpu(capsys):
    require_backend("cpu")
    assert selfcheck.main(["--device", "cpu", "--backends", "cpu,reference"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert "PASS" in lines["cpu"] and "PASS" in lines["reference"]
    assert [c.strip() for c in lines["cpu"].split("|")[1:3]] == ["pass", "pass"]
    assert "PASS: all 2 backend(s) passed" in out


@pytest.mark.parametrize("what", ["out", "grad_x"])
def test_selfcheck_fails_loudly_on_a_wrong_backend(monkeypatch, capsys, what):
    """A wrong output, or a right output with a wrong gradient, fails the check."""
    require_backend("cpu")
    real = ck.fused_peg

    def wrong(x, weight, bias=None, size=None, num_prefix_tokens=1, backend="auto"):
        out = real(x, weight, bias, size, num_prefix_tokens, backend)
        if backend != "cpu":
            return out
        if what == "out":
            return out + 1e-2 * out.detach().abs().max()
        return out + 0.5 * (x - x.detach())  # the same values; grad_x gains half of grad_out

    monkeypatch.setattr(ck, "fused_peg", wrong)
    assert selfcheck.main(["--device", "cpu", "--backends", "cpu,reference"]) == 1
    out = capsys.readouterr().out
    lines = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert "FAIL" in lines["cpu"] and "PASS" in lines["reference"]
    assert f"FAIL cpu parity: {what}" in out and "1 of 2 backend(s) failed: cpu" in out


def test_selfcheck_fails_a_failed_gradcheck(monkeypatch, capsys):
    """A backend whose parity passes but whose gradcheck fails fails the check."""
    require_backend("cpu")
    real = selfcheck.check_gradcheck

    def failing(name, device, gen):
        return "Jacobian mismatch" if name == "cpu" else real(name, device, gen)

    monkeypatch.setattr(selfcheck, "check_gradcheck", failing)
    assert selfcheck.main(["--device", "cpu", "--backends", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL cpu gradcheck: Jacobian mismatch" in out
    assert "1 of 1 backend(s) failed: cpu" in out


def test_selfcheck_fails_without_a_fused_backend(monkeypatch, capsys):
    """Where only the reference runs (no extension, no Triton), the check fails and says so:
    the reference passing its own checks is no sign that the package works."""
    monkeypatch.setattr(ck, "available_backends", lambda device=None: ["reference"])
    assert selfcheck.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: no fused backend runs on cpu" in out


def test_selfcheck_rejects_an_unavailable_backend(capsys):
    assert selfcheck.main(["--device", "cpu", "--backends", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_peg_tiny_run_on_gpu(tmp_path):
    """The CUDA timing path: events, L2 flush, peak memory, every GPU backend and compile."""
    if not HAS_GPU:
        pytest.skip("GPU-only: no CUDA device")
    backends = bench_peg.fused_backends(torch.device("cuda"))  # with the cuda-* variants
    assert ({"cuda-stream", "cuda-tile", "cuda-pipe"} <= set(backends)) or "cuda" not in backends
    assert "triton-stream" in backends or "triton" not in backends
    rc = bench_peg.main(TINY + ["--device", "cuda", "--dtypes", "float32", "float16",
                                "--passes", "fwd,bwd,fwdbwd", "--impls", "eager", "compile",
                                *backends, "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "peg.csv")
    assert len(rows) == 2 * 2 * 2 * 3 * (2 + len(backends))
    assert {r["impl"] for r in rows} == {"eager", "compile", *backends}
    for r in rows:
        assert r["status"] == "ok" and r["device_type"] == "cuda", r
        assert float(r["median_ms"]) > 0 and float(r["peak_mem_mib"]) >= 0
        assert float(r["copy_gbps"]) > 100


@pytest.mark.gpu
def test_selfcheck_passes_on_gpu(capsys):
    if not HAS_GPU:
        pytest.skip("GPU-only: no CUDA device")
    assert selfcheck.main(["--device", "cuda"]) == 0, capsys.readouterr().out


def test_tune_triton_tiny_sweep(tmp_path):
    """The Triton block-size sweep times the default and each given configuration, checks each
    against the float64 reference and writes a row per configuration (under the interpreter on
    a CPU; the times mean nothing there)."""
    require_backend("triton")
    import tune_triton
    rc = tune_triton.main(["--shapes", "2x12x3x4", "--fwd-configs", "8x8x1", "8x16x1",
                           "--bwd-configs", "16x8x1", "--min-time", "0.001", "--min-reps", "1",
                           "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "tune.csv")
    fwd = [r for r in rows if r["pass"] == "fwd"]
    bwd = [r for r in rows if r["pass"] == "bwd"]
    assert len(fwd) == 3 and len(bwd) == 2  # the default first, then the candidates
    assert [r["default"] for r in fwd + bwd] == ["True", "False", "False", "True", "False"]
    assert {(r["BLOCK_T"], r["BLOCK_C"], r["num_warps"]) for r in fwd[1:]} == {
        ("8", "8", "1"), ("8", "16", "1")}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["max_rel_err"]) <= 1.6e-2 and float(r["median_ms"]) > 0
    with pytest.raises(SystemExit):
        tune_triton.parse_args(["--fwd-configs", "16x48x4"])  # not a power of two


def test_tune_triton_streaming_kernels(tmp_path):
    """--kernels stream sweeps BLOCK_W x BLOCK_C x warps of the streaming 3x3 kernels, each with
    the geometry model's strip height and programs per SM for that block, or with every --per-sm
    (persistent programs per SM) and --rh (rows a strip) value."""
    require_backend("triton")
    import tune_triton
    from cpvt_kernels import triton_peg
    rc = tune_triton.main(["--kernels", "stream", "--shapes", "1x8x9x5", "--fwd-configs",
                           "4x8x1", "--bwd-configs", "4x8x1", "--per-sm", "0", "1",
                           "--rh", "5", "--min-time", "0.001", "--min-reps", "1",
                           "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "tune.csv")
    assert [(r["pass"], r["default"]) for r in rows] == [
        ("fwd", "True"), ("fwd", "False"), ("fwd", "False"),
        ("bwd", "True"), ("bwd", "False"), ("bwd", "False")]
    assert {r["kernels"] for r in rows} == {"stream"}
    # the defaults: the model's geometry for one image of 9 x 5 x 8 in bfloat16 on one SM (a CPU)
    for row, kind in ((rows[0], "fwd"), (rows[3], "bwd")):
        want = triton_peg.stream_config(kind, 9, 5, 8, 1, 1, 2)
        assert {k: row[k] for k in want} == {k: str(v) for k, v in want.items()}
    assert [(r["BLOCK_W"], r["BLOCK_C"], r["num_warps"], r["PER_SM"], r["RH"])
            for r in rows[1:3]] == [("4", "8", "1", "0", "5"), ("4", "8", "1", "1", "5")]
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["max_rel_err"]) <= 1.6e-2
    # without --per-sm and --rh: the model's for the candidate block
    rc = tune_triton.main(["--kernels", "stream", "--shapes", "2x8x9x5", "--passes", "fwd",
                           "--fwd-configs", "2x8x1", "--min-time", "0.001", "--min-reps", "1",
                           "--out", str(tmp_path / "model")])
    assert rc == 0
    rows = _rows(tmp_path / "model" / "tune.csv")
    want = triton_peg.stream_config("fwd", 9, 5, 8, 2, 1, 2, block=(2, 8))
    assert (rows[1]["RH"], rows[1]["PER_SM"]) == (str(want["RH"]), str(want["PER_SM"]))
    with pytest.raises(SystemExit):
        tune_triton.main(["--kernels", "stream", "--kernel-size", "5"])


def test_streaming_triton_kernels_fit_one_wave():
    """The streaming kernels' geometry model never asks an SM for more persistent programs than
    their registers let it hold (ptxas's count, sm_90), at the benchmark's shapes in bfloat16,
    float32 and float64: the budgets of ``_STREAM_WARPS_PER_SM`` against the compiler."""
    _require_triton_cuobjdump()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "triton_compile.py"), "--kernels",
                           "stream", "--dtypes", "bfloat16", "float32", "float64", "--shapes",
                           "128x192x14", "128x384x14", "64x384x24", "32x768x32", "--one-wave",
                           "--resources-only"],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    import re
    fits = [tuple(map(int, m.groups())) for m in re.finditer(r" (\d+)/(\d+)  ", out)]
    assert len(fits) == 4 * 3 * 3, out  # fwd, grad_x, bwd of each shape and dtype
    assert all(0 < asked <= held for asked, held in fits), out


def test_streaming_triton_loops_carry_their_rows(tmp_path):
    """Compiled, the streaming kernels' walk down a strip carries the rows it keeps from one
    iteration to the next (Triton carries only names whose value the body changes; the
    interpreter runs the Python and cannot tell): the accumulators of two output rows, the row
    index and the rows loaded ahead, and in the backward also the ten weight- and bias-gradient
    sums and grad_out rows r - 1 and r - 2. Counted, as Triton releases name the carried values
    differently (3.8 by variable, 3.6 partly by initial value)."""
    _require_triton_cuobjdump()
    from cpvt_kernels import triton_peg
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, str(BENCH / "triton_compile.py"), "--kernels",
                           "stream", "--shapes", "8x384x14", "--dtypes", "bfloat16",
                           "--carried", "--resources-only"], capture_output=True, text=True,
                          env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not list(tmp_path.iterdir()), "triton_compile.py left its cubins behind"
    carried = {}
    kernel = None
    for line in out.splitlines():
        if "_kernel" in line:
            kernel = " ".join(line.split()[7:9])  # pass and kernel name
        elif "carries:" in line:
            names = line.split("carries:")[1].split()
            if names != ["p0"]:  # the prefix tokens' copy, a chunk at a time
                carried.setdefault(kernel, []).append(names)
    prefetch = {kind: triton_peg.stream_config(kind, 14, 14, 384, 8, 132, 2)["PREFETCH"]
                for kind in ("fwd", "grad_x", "bwd")}
    for kind in ("fwd", "grad_x"):
        inner = carried[f"{kind} _peg_stream3_fwd_kernel"][-1]
        assert len(inner) == 3 + 3 * (prefetch[kind] > 0) and "r" in inner, (kind, out)
    outer, inner = carried["bwd _peg_stream3_bwd_kernel"]
    sums = {f"d{i}{j}" for i in range(3) for j in range(3)} | {"db"}
    rows_ahead = 3 * (prefetch["bwd"] >= 1) + 3 * (prefetch["bwd"] >= 2)
    assert len(inner) == 10 + 5 + rows_ahead, out  # sums, acc_p, acc_c, g1, g2, r
    assert sums <= set(inner) and "r" in inner, out
    assert sums <= set(outer), out  # and the walk over the items carries the sums on


def _require_triton_cuobjdump():
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import triton
    if not glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump")):
        pytest.skip("Triton's package has no cuobjdump")


def test_triton_kernels_compile_for_sm90_without_spills():
    """bench/triton_compile.py compiles every Triton kernel the launchers start, as they start
    it, for sm_90 (no GPU needed) and finds no stack frame (spilled registers) at CPVT-S."""
    _require_triton_cuobjdump()
    # A process of its own: here triton runs interpreted (TRITON_INTERPRET), which compiles
    # nothing.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "triton_compile.py"), "--shapes",
                           "8x384x14", "--dtypes", "bfloat16", "float32", "--no-spills"],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    rows = [l for l in out.splitlines() if "_kernel" in l]
    # per dtype: tile fwd, grad_x, bwd + reduction; stream fwd, grad_x, bwd + reduction
    assert len(rows) == 2 * 8, out
    for name in ("_peg_fwd_kernel", "_peg_bwd_kernel", "_peg_stream3_fwd_kernel",
                 "_peg_stream3_bwd_kernel", "_reduce_partials_kernel"):
        assert any(name in r for r in rows), name
    # After the blocks: warps, registers, stack, shared, SASS instructions, innermost loop body,
    # outermost loop body ("-" where loops do not nest), i/elem
    import re
    nums = {}
    for r in rows:
        m = re.search(r"(_\w+_kernel)\s+\S+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)"
                      r"\s+(\d+|-)\s+([\d.]+)\s+(.*)$", r)
        assert m, r
        warps, regs, _, _, sass, loop = (float(v) for v in m.groups()[1:7])
        outer, per_elem = m.group(8), float(m.group(9))
        assert regs > 0 and sass > 0 and per_elem > 0 and "LDG" in m.group(10), r
        # the streaming kernels and the reduction walk a loop; the tiled kernels have none
        assert (loop > 0) == ("stream3" in r or "reduce" in r), r
        # the persistent streaming kernels walk their items around the walk down the rows
        assert (outer != "-") == ("stream3" in r), r
        if outer != "-":
            assert loop < float(outer) < sass, r
        dtype, family, pass_name = r.split()[5:8]
        nums[(dtype, family, pass_name, m.group(1))] = per_elem
    # the streaming forward issues far fewer instructions per element than the tiled one
    for dt in ("bf16", "fp32"):
        assert nums[(dt, "stream", "fwd", "_peg_stream3_fwd_kernel")] < \
            nums[(dt, "tile", "fwd", "_peg_fwd_kernel")] / 2, nums


def _extension_sm90_kernels(pattern: str) -> list[dict]:
    """bench/cuda_sass.py's rows for the built extension's sm_90 kernels whose names match
    `pattern`; skips where there are none to read (no CUDA build, no cuobjdump, no sm_90)."""
    import re
    from cpvt_kernels import ops
    if not ops.HAS_CUDA_KERNELS:
        pytest.skip("the extension has no CUDA kernels")
    import cuda_sass
    try:
        tool = cuda_sass.cuobjdump()
    except SystemExit as e:
        pytest.skip(str(e))
    binary = sorted(glob.glob(str(BENCH.parent / "cpvt_kernels" / "_C*.so")))
    if not binary:
        pytest.skip("the extension is not built in the source tree")
    rows = [r for r in _sm90_rows(binary[0], os.path.getmtime(binary[0]), tool)
            if re.search(pattern, r["name"])]
    if not rows:
        pytest.skip("the extension has no sm_90 code (TORCH_CUDA_ARCH_LIST)")
    return rows


@functools.lru_cache(maxsize=2)
def _sm90_rows(binary: str, mtime: float, tool: str) -> tuple:
    """cuda_sass.kernels(binary, 90), read once for the tests that share it (about 15 s on 2
    cores: the disassembly of every kernel); `mtime` keys a rebuilt extension apart."""
    import cuda_sass
    return tuple(cuda_sass.kernels(binary, 90, tool))


def test_cuda_forward_kernels_store_whole_vectors():
    """The CUDA forward kernels (tiled, streaming and cp.async; their input-gradient instances
    too) store each output vector of the 16-bit types and float32 with one instruction of its
    width (bench/cuda_sass.py over the built extension's sm_90 code). Assigning the Pack let nvcc
    split them into 2- and 4-byte stores. The cp.async forward also copies the prefix tokens in
    16-byte pieces."""
    import re
    rows = _extension_sm90_kernels(r"peg_(stream_|pipe_)?forward_kernel<")
    sizes = {"BFloat16": 2, "Half": 2, "float": 4}
    kinds = {32: "STG.E", 64: "STG.E.64", 128: "STG.E.128"}
    checked = set()
    for r in rows:
        m = re.search(r"peg_(stream_|pipe_)?forward_kernel<(?:c10::)?(\w+), (\d+),", r["name"])
        assert m, r["name"]
        # double: two 8-byte stores a vector, by choice; a single 16-bit value: one store anyway
        width = 8 * sizes.get(m.group(2), 0) * int(m.group(3))
        if width not in kinds:
            continue
        stores = set(re.findall(r"(STG[\w.]*)x\d+", r["memory"]))
        want = {kinds[width]} | ({"STG.E.128"} if m.group(1) == "pipe_" else set())
        assert stores == want, (r["name"], r["memory"])
        checked.add((m.group(1), m.group(2)))
    # tiled, streaming and cp.async, each in bfloat16, half and float32
    assert len(checked) == 9, (checked, [r["name"] for r in rows])


def test_cuda_pipe_kernels_fit_their_registers():
    """The package's cp.async kernels (CPVT_CUDA_KERNELS=pipe) keep to the registers they ask
    for with no stack frame: the forward 96 (three blocks of 224 threads an SM at CPVT-S), the
    16-bit backward 144 (two); and are not compiled away (bench/cuda_sass.py over the built
    extension's sm_90 code)."""
    import re
    import shutil
    rows = _extension_sm90_kernels(r"peg_pipe_")
    fwd = [r for r in rows if "peg_pipe_forward_kernel<" in r["name"]]
    bwd = [r for r in rows if "peg_pipe_backward_kernel<" in r["name"]]
    # bfloat16, half (and float32); the backward with grad_x and without
    assert len(fwd) == 3 and len(bwd) == 4, [r["name"] for r in rows]
    # The limits are __maxnreg__, which nvcc has from 12.4 on (before, the kernels build without).
    home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc \
        and os.access(nvcc, os.X_OK) else ""
    m = re.search(r"release (\d+)\.(\d+)", out)
    limits = m is not None and (int(m.group(1)), int(m.group(2))) >= (12, 4)
    for r in fwd + bwd:
        limit = 96 if r in fwd else 144
        assert r["stack"] == 0 and (r["regs"] <= limit or not limits), \
            (r["name"], r["regs"], r["stack"])
        assert r["sass"] > 200 and "LDG" in r["memory"], (r["name"], r["sass"], r["memory"])


def test_cuda_micro_builds():
    """bench/cuda_micro/peg_micro.cu, which the GPU suite builds and runs on the GPU machine,
    compiles against the current kernel headers (its build.sh, nvcc for sm_90), with the variants
    a GPU run is to time in it; the cp.async kernels keep their registers (no stack frame). The
    build starts when the tests are collected (conftest.cuda_micro_build)."""
    import re
    from conftest import cuda_micro_build, cuda_micro_nvcc
    if cuda_micro_nvcc() is None:
        pytest.skip("no nvcc")
    import cuda_sass
    try:
        tool = cuda_sass.cuobjdump()
    except SystemExit as e:
        pytest.skip(str(e))
    rc, log, out = cuda_micro_build(timeout=1200)
    assert rc == 0, log[-6000:]
    rows = cuda_sass.kernels(str(out), 90, tool)
    pipe = [k for k in rows if re.search(r"peg_pipe_(forward|backward)_kernel", k["name"])]
    assert len(pipe) >= 12, [k["name"] for k in rows]
    assert all(k["stack"] == 0 for k in pipe), [(k["name"], k["stack"]) for k in pipe]
    # not compiled away (a __host__ call in their thread code leaves an empty kernel)
    assert all(k["sass"] > 200 and "LDG" in k["memory"] for k in pipe), \
        [(k["name"], k["sass"]) for k in pipe]
    assert any("peg_stream_backward_kernel_minb" in k["name"] for k in rows)
