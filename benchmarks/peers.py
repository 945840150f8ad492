"""`make bench` section (i): the default job (`make train`) against PyTorch Lightning DDP doing the same
schedule, on the 2-host test cluster at 100 Mbit/s, and where the wall-clock outside the training loop goes.

Arms, seed by seed, interleaved so that all see the same load:
  adabatch-hvd       launch/run-multinode.sh -H node1:1,node2:1 --gloo, configs/fashion_mnist.yaml --no-augment
  adabatch-hvd fp16  the same with --compression fp16
  lightning          benchmarks/lightning_job.py, DDP over Gloo, GradientAccumulationScheduler({0: 1, 2: 2, 4: 4})
                     at 64 per process (global 128 -> 256 -> 512), the same model, data, LRs and weight decay;
                     started on node1 and, over ssh from node1, on node2
  lightning fp16     the same with DDP's fp16_compress_hook
Plus the default job once on one host (launch/run-local.sh 2), for the start-up on one host.

The phases of a run come from its RUN_DIR/timing.jsonl (adabatch_hvd/phases.py): unix times of rank 0's
marks; this driver adds the launcher's share (its start to rank 0's process start) and the exit (the
end of the run to the launcher's exit). The hosts are namespaces of one machine: one clock.

    python benchmarks/peers.py [--seeds 0,1,2] [--bandwidth 100mbit] [--out DIR] [--no-lightning]
writes DIR/peers.json and prints the markdown section; bench.py puts it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import env, records, table  # noqa: E402
from commbound import BIN, HOSTS, IFACE, Runner, load, tcp_throughput  # noqa: E402

JOB = ["--config", "configs/fashion_mnist.yaml", "--threads", "1", "--no-augment"]  # the job: no augmentation
ARMS = {"defaults": {"adabatch": [], "lightning": "none"},
        "fp16 compression": {"adabatch": ["--compression", "fp16"], "lightning": "fp16"}}
PORT = 29533
SMOKE = ["--train-samples", "4096", "--epochs", "2"]  # --smoke: both frameworks, a few seconds of training


def lightning_python() -> str | None:
    """The benchmark's own Lightning environment (made on first use), or None where it cannot be made."""
    proc = subprocess.run([ROOT / "benchmarks/lightning_env.sh"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        print(f"peers: no Lightning environment, its arms are left out: {proc.stderr.strip()[-500:]}",
              file=sys.stderr)
        return None
    return proc.stdout.strip().splitlines()[-1]


def adabatch(r: Runner, run_dir: Path, seed: int, flags: list, cluster=None) -> dict:
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    args = ["--", *JOB, *flags, "--seed", seed, "--run-dir", run_dir]
    if cluster:
        cmd = [ROOT / "launch/run-multinode.sh", "-H", HOSTS, "-i", IFACE, "--gloo", "--threads", "1", *args]
    else:
        cmd = [ROOT / "launch/run-local.sh", 2, "--gloo", "--threads", "1", *args]
    before, t0 = load(), time.time()
    r.run(cmd, cluster)
    t1 = time.time()
    recs = records(run_dir)
    timing = json.loads((run_dir / "timing.jsonl").read_text().splitlines()[-1])
    return {"wall": t1 - t0, "train": sum(e["epoch_seconds"] for e in recs), "acc": recs[-1]["test_acc"],
            "batches": [e["global_batch"] for e in recs], "launched": t0, "ended": t1, "timing": timing,
            "load": [before, load()]}


def lightning(r: Runner, py: str, out: Path, seed: int, compression: str, cluster, extra: list) -> dict:
    """One process per host: node1's started there, node2's over ssh from node1, as a user would."""
    out.unlink(missing_ok=True)
    common = {"MASTER_ADDR": cluster.address("node1"), "MASTER_PORT": str(PORT), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
              "GLOO_SOCKET_IFNAME": IFACE, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    job = [py, ROOT / "benchmarks/lightning_job.py", "--num-nodes", 2, "--seed", seed, "--compression", compression,
           "--no-augment", *extra, "--out", out]
    line = " ".join(shlex.quote(str(c)) for c in job)
    cmds = [["env", *(f"{k}={v}" for k, v in {**common, "NODE_RANK": str(i)}.items()), *map(str, job)]
            if i == 0 else ["ssh", host, f"cd {shlex.quote(str(ROOT))} && " + " ".join(
                f"{k}={shlex.quote(v)}" for k, v in {**common, "NODE_RANK": str(i)}.items()) + " " + line]
            for i, host in enumerate(("node1", "node2"))]
    for cmd in cmds:
        r._note(cmd, "node1$ ", " &")
    before, t0 = load(), time.time()
    procs = [cluster.popen("node1", cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for cmd in cmds]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    t1 = time.time()
    if any(p.returncode for p in procs):
        sys.exit(f"peers: lightning failed: {[p.returncode for p in procs]}\n" + "\n".join(o[-2000:] for o in outs))
    res = json.loads(out.read_text())
    return {"wall": t1 - t0, "train": res["fit_seconds"], "acc": res["final_test_acc"],
            "batches": [e["global_batch"] for e in res["epochs"]], "detail": res, "load": [before, load()]}


def step_scalars(r: Runner, smoke: bool) -> dict:
    """benchmarks/stop_check.py on one host, 2 ranks, under Gloo and MPI: what the stop agreement adds to a
    step as a collective of its own and riding on the gradient exchange, and what the noise scale adds."""
    rounds = ["3", "5"] if smoke else []
    out = {}
    for controller in ("gloo", "mpi"):
        proc = r.run([BIN / "horovodrun", "-np", 2, "-H", "localhost:2", f"--{controller}", sys.executable,
                      ROOT / "benchmarks/stop_check.py", *rounds])
        # horovodrun prefixes each line with its rank ("[0]<stdout>:", mpirun's "[1,0]<stdout>:")
        text = re.sub(r"\[[\d,]+\]<stdout>:", "\n", proc.stdout)
        out[controller] = [line for line in text.splitlines() if line.strip()]
    return out


def phases(run: dict) -> dict:
    """Rank 0's phases in order, with the launcher's share first and the exit last (seconds)."""
    t = run["timing"]
    out = {"launcher, ssh": t["process_start"] - run["launched"], **t["phases"]}
    out["exit"] = run["ended"] - t["marks"]["finish"]
    return out


def measure(seeds: list, bandwidth: str, out: Path, with_lightning: bool, extra: list) -> dict:
    from cluster import Cluster

    r = Runner()
    work = out / "runs" / "peers"
    work.mkdir(parents=True, exist_ok=True)
    py = lightning_python() if with_lightning else None
    res = {"seeds": seeds, "bandwidth": bandwidth, "runs": {}, "lightning_python": py, "smoke": bool(extra)}
    res["one_host"] = adabatch(r, work / "one-host", seeds[0], extra)
    with Cluster(n_hosts=2) as c:
        for h in c.hosts:
            c.set_bandwidth(h, bandwidth)
        res["tcp_bits_per_second"] = tcp_throughput(c)
        for s in seeds:
            for arm, how in ARMS.items():
                res["runs"].setdefault(f"adabatch-hvd|{arm}", []).append(
                    adabatch(r, work / f"{arm.split()[0]}-s{s}", s, [*how["adabatch"], *extra], c))
                if py:
                    res["runs"].setdefault(f"lightning|{arm}", []).append(
                        lightning(r, py, work / f"lightning-{arm.split()[0]}-s{s}.json", s, how["lightning"], c,
                                  extra))
    res["step_scalars"] = step_scalars(r, bool(extra))
    res["log"] = r.log
    (out / "peers.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def mean(xs):
    return statistics.mean(xs) if xs else float("nan")


def markdown(res: dict, before: dict | None = None) -> str:
    runs, bw = res["runs"], res["bandwidth"]
    s = ["## (i) Against PyTorch Lightning at default settings, and the time outside the training loop", ""]
    if res.get("smoke"):
        s += [f"**Smoke run** (`--smoke`: {' '.join(SMOKE)}): checks the driver; its figures mean nothing.", ""]
    s += [
        f"The `make train` job (fmnist_cnn on Fashion-MNIST, 6 epochs, global batch 128 -> 256 -> 512, no "
        f"augmentation) on two hosts of the test cluster at {bw} (one TCP stream measured "
        f"{res['tcp_bits_per_second'] / 1e6:.0f} Mbit/s), one process per host with one thread, against the same "
        "job in PyTorch Lightning 2.6.6 (`benchmarks/lightning_job.py`: DDP over Gloo, "
        "`GradientAccumulationScheduler({0: 1, 2: 2, 4: 4})` at 64 per process, the same model, initial weights, "
        f"data, LRs and weight decay, validation on the test set every epoch); seeds {res['seeds']}, the four "
        "runs of a seed one after the other. `training` is adabatch-hvd's sum of `epoch_seconds` (evaluation "
        "excluded) and Lightning's `fit` (its validation included); `outside` is wall-clock minus that.", ""]
    rows, summ = [], {}
    for name, xs in runs.items():
        fw, arm = name.split("|")
        summ[name] = {k: mean([x[k] for x in xs]) for k in ("wall", "train", "acc")}
        rows.append((fw, arm, f"{summ[name]['wall']:.1f}", f"{summ[name]['train']:.1f}",
                     f"{summ[name]['wall'] - summ[name]['train']:.1f}",
                     f"{100 * summ[name]['acc']:.2f} (" + ", ".join(f"{100 * x['acc']:.2f}" for x in xs) + ")",
                     "; ".join(f"{x['load'][0][0]} -> {x['load'][1][0]}" for x in xs)))
    s += [table(["framework", "arm", "wall-clock s", "training s", "outside s", "final test acc % (per seed)",
                 "load avg before -> after"], rows), ""]
    for arm in ARMS:
        a, l_ = summ.get(f"adabatch-hvd|{arm}"), summ.get(f"lightning|{arm}")
        if a and l_:
            s += [f"- {arm}: adabatch-hvd is **{l_['wall'] / a['wall']:.2f}x** Lightning's wall-clock "
                  f"(>1: faster), accuracy {100 * (a['acc'] - l_['acc']):+.2f} points."]
    s += [""]
    s += time_to_first_step(res, before)
    if res.get("step_scalars"):
        s += ["The per-step scalars (`benchmarks/stop_check.py`, one host, 2 ranks, one step of 64 per rank timed "
              "each way in interleaved rounds): `separate` is the stop agreement as a collective of its own after "
              "the step (as before issue 19), `fused` the flag riding on the step's gradient exchange (as now), and "
              "the noise scale's cost is `fused+noise` against `fused` (issue 20), measured on every step and on every "
              "8th (schedule.noise_every's default).", ""]
        for controller, lines in res["step_scalars"].items():
            s += [f"{controller}:", "", "```", *lines, "```", ""]
    s += ["Commands:", "", "```", *res["log"], "```", ""]
    return "\n".join(s)


def time_to_first_step(res: dict, before: dict | None) -> list:
    """The phases of the default job: one host, two hosts (mean over seeds), and before the cuts."""
    cols = {"one host": [res["one_host"]], f"2 hosts at {res['bandwidth']}": res["runs"]["adabatch-hvd|defaults"]}
    if before:
        cols = {**{f"before: {k}": v for k, v in before["columns"].items()}, **cols}
    names = []
    for xs in cols.values():
        for x in xs:
            names += [n for n in phases(x) if n not in names]
    table_rows = []
    for n in names:
        table_rows.append((n, *(f"{mean([phases(x).get(n, 0.0) for x in xs]):.2f}" for xs in cols.values())))
    for label, key in (("of which evaluation", "evaluation"), ("of which checkpoints", "checkpoint")):
        table_rows.append((label, *(f"{mean([x['timing']['repeated'].get(key, {}).get('seconds', 0.0) for x in xs]):.2f}"
                                    for xs in cols.values())))
    first = [mean([sum(v for k, v in phases(x).items() if names.index(k) <= names.index("first step"))
                   for x in xs]) for xs in cols.values()]
    table_rows.append(("**launch to the end of the first step**", *(f"**{v:.2f}**" for v in first)))
    return [f"Where the default job's wall-clock goes (rank 0's marks, `RUN_DIR/timing.jsonl`; seconds, each phase "
            "from the end of the one before):", "", table(["phase", *cols], table_rows), ""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2])
    ap.add_argument("--bandwidth", default="100mbit")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--no-lightning", action="store_true", help="leave the Lightning arms out")
    ap.add_argument("--smoke", action="store_true", help=f"every run with {' '.join(SMOKE)}: checks the driver")
    ap.add_argument("--before", type=Path, help="a peers.json of an earlier commit: its phases as 'before' columns")
    ap.add_argument("--reuse", action="store_true", help="rewrite the section from an earlier DIR/peers.json")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res = json.loads((a.out / "peers.json").read_text()) if a.reuse else \
        measure(a.seeds, a.bandwidth, a.out, not a.no_lightning, SMOKE if a.smoke else [])
    before = None
    if a.before:
        b = json.loads(a.before.read_text())
        before = {"columns": {"one host": [b["one_host"]],
                              f"2 hosts at {b['bandwidth']}": b["runs"]["adabatch-hvd|defaults"]}}
    print(markdown(res, before))


if __name__ == "__main__":
    main()
