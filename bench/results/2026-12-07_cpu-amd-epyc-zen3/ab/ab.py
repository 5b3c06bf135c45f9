# python ab.py ROUNDS THREADS PASS "name=ENV=V,ENV2=V2" ... -- shapes
# The child script: AB_CHILD if set (a later folder's), else child.py beside this file.
import json, os, subprocess, sys, statistics
rounds, threads, passes = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rest = sys.argv[4:]
i = rest.index("--"); cfgs, shapes = rest[:i], rest[i + 1:]
py = sys.executable
child = os.environ.get("AB_CHILD") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
out = {}
for r in range(rounds):
    for cfg in cfgs:
        name, _, envs = cfg.partition("=")
        env = dict(os.environ)
        for kv in filter(None, envs.split(",")):
            k, v = kv.split(":", 1); env[k] = v
        pp = env.pop("PP", None)
        if pp: env["PYTHONPATH"] = pp
        res = json.loads(subprocess.check_output([py, child, threads, passes] + shapes, env=env, cwd="/tmp"))
        for s, (mn, md) in res.items():
            out.setdefault(s, {}).setdefault(name, []).append((mn, md))
for s, d in out.items():
    print(s)
    for name, v in d.items():
        mins = sorted(m for m, _ in v); meds = sorted(m for _, m in v)
        print(f"  {name:12s} min {mins[0]:7.3f}  median-of-mins {statistics.median(mins):7.3f}  medians {meds[0]:7.3f}-{meds[-1]:7.3f}")
