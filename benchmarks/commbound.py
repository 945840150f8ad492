"""`make bench` section (f): the communication-bound regime, 2 hosts joined by a bandwidth-limited link.

The hosts are tests/cluster.py's network namespaces on this machine (own hostname, sshd, veth cable
to a bridge), one Horovod rank each with one torch thread; the cable is limited with `tc tbf` in
both directions. Measured, for fmnist_cnn on Fashion-MNIST:
  f1  throughput against global batch at every bandwidth, against a model of the physical limit:
      per step, compute (one process on one host, the same per-worker batch and micro-batch)
      + allreduce (gradient bytes x 2(N-1)/N / bandwidth)
  f2  AdaBatch against fixed-small at the slowest link, several seeds: time to the same epochs,
      time to a target accuracy, accuracy, and the speedup predicted from f1's throughputs
  f2b the same with one more stage: 6 epochs, 128 -> 4096
  f3  fixed-large with Goyal et al.'s gradual warmup, tuned over warmup lengths and LRs on one host,
      the best against AdaBatch at equal wall-clock on one host and at the slowest link
  f4  the knobs that cut communication at the slowest link: fp16 compression (bytes counted),
      Horovod's fusion threshold and cycle time, and its autotuner

    python benchmarks/commbound.py [--profile full|reduced|smoke] [--out DIR]
writes DIR/commbound.json, DIR/comm_throughput.png and prints the markdown section; bench.py puts
it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
BIN = Path(sys.executable).parent

from bench import ACC_COMMON, RUNS, env, records, table  # noqa: E402

PROFILES = {
    "full": dict(decompose_batches=[32, 128, 512], bandwidths=["unlimited", "1gbit", "100mbit"], batches=[32, 64, 128, 256, 512, 1024, 2048, 4096],
                 cap=256, tp_samples=8192, repeats=2, seeds=[0, 1, 2], acc_samples=None, target=0.88,
                 warmups=[1, 2, 3], warmup_lrs=[0.05, 0.025, 0.0125], knob_batches=[128, 1024], knob_samples=8192,
                 knobs=None, longer=True),
    "reduced": dict(decompose_batches=[32, 512], bandwidths=["unlimited", "1gbit", "100mbit"], batches=[32, 128, 512, 2048], cap=256,
                    tp_samples=4096, repeats=1, seeds=[0], acc_samples=12000, test_samples=2000, target=0.85,
                    warmups=[1, 2, 3], warmup_lrs=[0.025], knob_batches=[128], knob_samples=4096,
                    knobs=None, longer=True),
    "smoke": dict(decompose_batches=[64], bandwidths=["unlimited", "100mbit"], batches=[64, 512], cap=256, tp_samples=1024, repeats=1,
                  seeds=[0], acc_samples=2048, target=0.5, warmups=[1], warmup_lrs=[0.025], knob_batches=[128],
                  knob_samples=1024, knobs=["default", "fp16 compression"], longer=False),
}
HOSTS = "node1:1,node2:1"
WORLD = 2
# Named, not discovered: horovodrun caches the interfaces it found per host list for an hour in
# ~/.horovod, and another cluster with the same host names (node1, node2) may have used eth1.
IFACE = "eth0"
DECOMPOSE = {  # name -> flags of worker.py minimal (2 ranks on one host)
    "independent": ["--plain"],
    "lockstep": ["--plain", "--lockstep"],
    "allreduce": [],
}
KNOBS = {  # name -> worker flags; each is measured against "default" at the slowest link
    "default": [],
    "fp16 compression": ["--compression", "fp16"],
    "no tensor fusion (threshold 0)": ["--fusion-mb", "0"],
    "cycle time 10 ms": ["--cycle-ms", "10"],
    "autotune": ["--autotune"],
}


def bits_per_second(rate: str, links: dict) -> float:
    """The link's bandwidth for the model: the tbf rate ('100mbit' -> 1e8); with no limit, what one TCP
    stream measured (the veth pair is then limited by the CPU that moves the packets)."""
    if rate == "unlimited":
        return links[rate]["tcp_bits_per_second"]
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    unit = next(u for u in units if rate.endswith(u))
    return float(rate[: -len(unit)]) * units[unit]


def load() -> list:
    return [round(x, 1) for x in os.getloadavg()]


class Runner:
    """Runs commands on this host or on a cluster host and logs them for RESULTS.md."""

    def __init__(self):
        self.log = []

    def _note(self, cmd: list, prompt: str, tail: str = "") -> None:
        """Log a command as RESULTS.md shows it: paths relative to the repository."""
        self.log.append(prompt + " ".join(shlex.quote(c) for c in cmd).replace(str(BIN) + "/", ".venv/bin/")
                        .replace(str(ROOT) + "/", "") + tail)
        print(self.log[-1], file=sys.stderr, flush=True)

    def run(self, cmd, cluster=None, check=True, timeout=7200) -> subprocess.CompletedProcess:
        cmd = [str(c) for c in cmd]
        self._note(cmd, "node1$ " if cluster else "$ ")
        if cluster:
            proc = cluster.run("node1", cmd, cwd=ROOT, env=env(), timeout=timeout)
        else:
            proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            sys.exit(f"commbound: command failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return proc

    def worker(self, mode, out, args, np_=WORLD, cluster=None) -> dict:
        where = ["-H", HOSTS, "--network-interfaces", IFACE] if cluster else ["-H", f"localhost:{np_}"]
        self.run([BIN / "horovodrun", "-np", np_, *where, "--gloo", sys.executable, ROOT / "benchmarks/worker.py",
                  mode, out, "--threads", 1, *args], cluster)
        return json.loads(Path(out).read_text())

    def workers_at_once(self, mode, outs, args) -> list:
        """One single-process worker per path in `outs`, all started together on this host: the compute of
        one rank while the other host's rank computes on the same cores, as it does in the cluster."""
        cmds = [[str(c) for c in (BIN / "horovodrun", "-np", 1, "-H", "localhost:1", "--gloo", sys.executable,
                                  ROOT / "benchmarks/worker.py", mode, out, "--threads", 1, *args)] for out in outs]
        for cmd in cmds:
            self._note(cmd, "$ ", " &")
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for cmd in cmds]
        for proc in procs:
            out, _ = proc.communicate(timeout=7200)
            if proc.returncode:
                sys.exit(f"commbound: command failed ({proc.returncode}):\n{out[-3000:]}")
        return [json.loads(Path(out).read_text()) for out in outs]

    def train(self, run_dir, flags, cluster=None) -> dict:
        """adabatch-train through the product's launchers; {records, error, load}."""
        if Path(run_dir).exists():
            import shutil

            shutil.rmtree(run_dir)
        args = ["--", *ACC_COMMON, *flags, "--threads", "1", "--run-dir", run_dir]
        if cluster:
            cmd = [ROOT / "launch/run-multinode.sh", "-H", HOSTS, "-i", IFACE, "--gloo", "--threads", "1", *args]
        else:
            cmd = [ROOT / "launch/run-local.sh", WORLD, "--gloo", "--threads", "1", *args]
        before = load()
        proc = self.run(cmd, cluster, check=False)
        errors = [line.split("error: ", 1)[1] for line in (proc.stderr + proc.stdout).splitlines()
                  if "adabatch-train: error:" in line]
        if proc.returncode and not errors:
            sys.exit(f"commbound: training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        recs = records(run_dir) if (Path(run_dir) / "metrics.jsonl").exists() else []
        return {"records": recs, "error": errors[0] if proc.returncode else None, "load": [before, load()]}


def tcp_throughput(cluster, seconds: float = 3.0) -> float:
    """Bits/s of one TCP stream node1 -> node2, measured at the receiver."""
    server = cluster.popen("node2", [sys.executable, "-c", (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 5299))\n"
        "s.listen(1); print('ready', flush=True); c, _ = s.accept(); n = len(c.recv(1 << 20)); t0 = time.time()\n"
        "while True:\n    b = c.recv(1 << 20)\n    n += len(b)\n    if not b: break\n"
        "print(n * 8 / (time.time() - t0))")], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    cluster.run("node1", [sys.executable, "-c", (
        "import socket, time\n"
        "c = socket.create_connection(('node2', 5299)); b = bytes(1 << 16); t0 = time.time()\n"
        f"while time.time() - t0 < {seconds}: c.sendall(b)\n"
        "c.shutdown(socket.SHUT_WR); c.recv(1)")], check=True, timeout=60)
    out, _ = server.communicate(timeout=60)
    return float(out.strip().splitlines()[-1])


def gradient_bytes(model: str = "fmnist_cnn") -> int:
    from adabatch_hvd.data import DatasetInfo
    from adabatch_hvd.models import build_model

    net = build_model(model, DatasetInfo(num_classes=10, in_channels=1, image_size=28))
    return sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)


def model_rate(batch: int, compute: dict, grad_bytes: int, bps: float, compression: float = 1.0) -> float:
    """Samples/s of the physical limit: compute of one worker's share + the allreduce on the link."""
    per_worker = batch // WORLD
    t_compute = per_worker / compute[per_worker]
    t_comm = grad_bytes * compression * 2 * (WORLD - 1) / WORLD * 8 / bps
    return batch / (t_compute + t_comm)


def predicted_seconds(recs: list, rate: dict) -> float | None:
    """Training time of a run if each epoch went at the fixed-batch throughput of its batch."""
    if not all(r["global_batch"] in rate for r in recs):
        return None
    return sum(r["epoch_seconds"] * r["samples_per_second"] / rate[r["global_batch"]] for r in recs)


def time_to(recs: list, target: float):
    return next((sum(e["epoch_seconds"] for e in recs[: i + 1]) for i, e in enumerate(recs)
                 if e["test_acc"] >= target), None)


def acc_at(recs: list, seconds: float):
    """Test accuracy after the last epoch finished within `seconds` of training (None: none had)."""
    t, acc = 0.0, None
    for e in recs:
        t += e["epoch_seconds"]
        if t > seconds * 1.0001:
            break
        acc = e["test_acc"]
    return acc


def longer_runs(p: dict, work: Path, extra: list, r: Runner, cluster) -> dict:
    """(f2b): the protocol of (f2) with one more stage (6 epochs, 128 -> 4096), seeds interleaved."""
    flags = {"adabatch": [*RUNS["adabatch"], "--max-batch", 4096], "fixed-small": RUNS["fixed-small"]}
    runs = {name: [] for name in flags}
    for s in p["seeds"]:
        for name, f in flags.items():
            runs[name].append(r.train(work / f"{p['bandwidths'][-1]}-longer-{name}-s{s}",
                                      [*f, *extra, "--epochs", 6, "--seed", s], cluster))
    return runs


def measure_longer(name: str, out: Path, r: Runner) -> dict:
    """(f2b) alone (`--only f2b`), on a cluster of its own at the slowest link."""
    from cluster import Cluster

    p = PROFILES[name]
    work = out / "runs" / "commbound"
    work.mkdir(parents=True, exist_ok=True)
    res = {"profile": p, "profile_name": name}
    with Cluster(n_hosts=2) as c:
        for h in c.hosts:
            c.set_bandwidth(h, p["bandwidths"][-1])
        res["tcp_bits_per_second"] = tcp_throughput(c)
        res["longer"] = longer_runs(p, work, acc_extra(p), r, c)
    res["log"] = r.log
    (out / "commbound-f2b.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def acc_extra(p: dict) -> list:
    """The accuracy runs' epochs, and their subset of the data in a reduced profile."""
    return ["--epochs", 5] + (["--train-samples", p["acc_samples"], "--test-samples", p.get("test_samples", 1000)]
                              if p["acc_samples"] else [])


def measure(name: str, out: Path, r: Runner) -> dict:
    from cluster import Cluster

    p = PROFILES[name]
    work = out / "runs" / "commbound"
    work.mkdir(parents=True, exist_ok=True)
    res = {"profile": p, "profile_name": name, "world": WORLD, "grad_bytes": gradient_bytes(), "load": {}}
    tp_args = ["--cap", p["cap"], "--samples", p["tp_samples"], "--repeats", p["repeats"]]

    # One host, one process: the compute of one worker's share at each per-worker batch.
    res["load"]["compute"] = [load()]
    per_worker = sorted({b // WORLD for b in p["batches"] + p["knob_batches"]})
    one = r.worker("throughput", work / "compute.json", ["--batches", ",".join(map(str, per_worker)), *tp_args], np_=1)
    res["compute"] = {pt["global_batch"]: pt["samples_per_second"] for pt in one["points"]}
    # The same, with two such processes at once: the two namespace hosts share this machine's cores.
    pair = r.workers_at_once("throughput", [work / f"compute-shared-{i}.json" for i in range(WORLD)],
                             ["--batches", ",".join(map(str, per_worker)), *tp_args])
    res["compute_shared"] = {pt["global_batch"]: statistics.mean(
        run["points"][i]["samples_per_second"] for run in pair) for i, pt in enumerate(pair[0]["points"])}
    res["load"]["compute"].append(load())
    # One host, two ranks of Horovod's example loop: with no communication, with the ranks waiting for each
    # other once per step but moving no gradients, and with the gradient allreduce: what each step adds.
    res["decompose"] = {b: {name: r.worker("minimal", work / f"minimal-{b}-{name}.json",
                                           ["--batches", b, "--samples", p["tp_samples"], "--repeats", p["repeats"],
                                            *flags])["samples_per_second"]
                            for name, flags in DECOMPOSE.items()}
                        for b in p["decompose_batches"]}
    res["load"]["compute"].append(load())

    # One host, two processes: AdaBatch and the fixed-large warmup grid (Goyal et al.).
    grid = [(lr, w) for lr in p["warmup_lrs"] for w in p["warmups"]]
    extra = acc_extra(p)
    res["one_host"] = {"adabatch": [r.train(work / f"host-adabatch-s{s}", [*RUNS["adabatch"], *extra, "--seed", s])
                                    for s in p["seeds"]]}
    res["grid"] = []
    for lr, w in grid:
        run = r.train(work / f"host-large-lr{lr}-w{w}", [*RUNS["fixed-large"], *extra, "--seed", p["seeds"][0],
                                                          "--lr", lr, "--warmup-epochs", w])
        res["grid"].append({"lr": lr, "warmup": w, **run})
    done = [g for g in res["grid"] if not g["error"]]
    best = max(done, key=lambda g: g["records"][-1]["test_acc"]) if done else None
    res["best"] = best and {"lr": best["lr"], "warmup": best["warmup"]}
    if best:
        res["one_host"]["fixed-large-warmup"] = [best] + [
            r.train(work / f"host-large-best-s{s}", [*RUNS["fixed-large"], *extra, "--seed", s, "--lr", best["lr"],
                                                      "--warmup-epochs", best["warmup"]]) for s in p["seeds"][1:]]

    # The cluster: throughput curves from the fastest link to the slowest, then the runs at the slowest.
    res["links"] = {}
    with Cluster(n_hosts=2) as c:
        for bw in p["bandwidths"]:
            if bw != "unlimited":
                for h in c.hosts:
                    c.set_bandwidth(h, bw)
            link = {"tcp_bits_per_second": tcp_throughput(c), "load": [load()]}
            curve = r.worker("throughput", work / f"tp-{bw}.json", ["--batches", ",".join(map(str, p["batches"])),
                                                                     *tp_args], cluster=c)
            link["points"] = curve["points"]
            link["load"].append(load())
            res["links"][bw] = link
            print(f"commbound: {bw}: TCP {link['tcp_bits_per_second'] / 1e6:.0f} Mbit/s; "
                  + ", ".join(f"B={pt['global_batch']} {pt['samples_per_second']:.0f}/s" for pt in curve["points"]),
                  file=sys.stderr, flush=True)
        slow = p["bandwidths"][-1]
        runs = {"adabatch": [], "fixed-small": []}
        for s in p["seeds"]:  # interleaved, so both see the same load
            for name in runs:
                runs[name].append(r.train(work / f"{slow}-{name}-s{s}", [*RUNS[name], *extra, "--seed", s], c))
        if best:
            runs["fixed-large-warmup"] = [r.train(work / f"{slow}-large-best-s{s}", [
                *RUNS["fixed-large"], *extra, "--seed", s, "--lr", best["lr"], "--warmup-epochs", best["warmup"]], c)
                for s in p["seeds"]]
        res["slow"] = runs
        if p["longer"]:
            res["longer"] = longer_runs(p, work, extra, r, c)
        knobs = {}
        for b in p["knob_batches"]:
            for name in p["knobs"] or KNOBS:
                flags = KNOBS[name]
                pt = r.worker("throughput", work / f"knob-{b}-{len(knobs)}.json",
                              ["--batches", b, "--cap", p["cap"], "--samples", p["knob_samples"], "--repeats",
                               p["repeats"], *flags], cluster=c)["points"][0]
                knobs[f"{name}|{b}"] = {"name": name, "batch": b, "samples_per_second": pt["samples_per_second"],
                                        "repeats": pt["repeats"], "load": load()}
        res["knobs"] = knobs
    # Bytes per step with and without fp16, counted at Horovod's allreduce_async_ (as in (e)); on one host,
    # since the count does not depend on the link.
    res["bytes"] = {c_: r.worker("comm", work / f"bytes-{c_}.json", ["--batches", 128, "--cap", 64, "--samples", 2048,
                                                                   "--epochs", 2, "--interval", 1, "--compression",
                                                                   c_])["stages"][0]["bytes_per_step"]
                    for c_ in ("none", "fp16")}
    res["log"] = r.log
    (out / "commbound.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (bw, link) in enumerate(res["links"].items()):
        xs = [pt["global_batch"] for pt in link["points"]]
        colour = f"C{i}"
        ax.plot(xs, [pt["samples_per_second"] for pt in link["points"]], "o-", color=colour, label=f"{bw} measured")
        model = [model_rate(b, res["compute"], res["grad_bytes"], bits_per_second(bw, res["links"])) for b in xs]
        ax.plot(xs, model, "--", color=colour, alpha=0.7, label=f"{bw} model (compute + allreduce)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (2 hosts, 1 rank each)")
    ax.set_ylabel("training samples/s")
    ax.set_title("fmnist_cnn, 2 hosts joined by a tbf-limited link")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(runs: list, target: float) -> dict:
    done = [x["records"] for x in runs if not x["error"] and x["records"]]
    if not done:
        return {"n": 0, "errors": [x["error"] for x in runs]}
    finals = [rec[-1]["test_acc"] * 100 for rec in done]
    times = [sum(e["epoch_seconds"] for e in rec) for rec in done]
    reached = [t for t in (time_to(rec, target) for rec in done) if t is not None]
    return {"n": len(done), "finals": finals, "acc": statistics.mean(finals),
            "acc_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0, "times": times,
            "time": statistics.mean(times), "time_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
            "to_target": statistics.mean(reached) if reached else None, "reached": len(reached),
            "batches": [e["global_batch"] for e in done[0]], "errors": [x["error"] for x in runs if x["error"]],
            "loads": [x["load"] for x in runs]}


def versus(runs: dict, rate: dict, target: float, slow: str, stages: int) -> list:
    """(f2)'s table and speedup for AdaBatch against fixed-small (and any other arm in `runs`)."""
    s = []
    summ = {name: summarize(x, target) for name, x in runs.items()}
    s += [table(["run", "global batch by epoch", "final test acc % (mean ± sd)", "per seed", "train seconds",
                 f"seconds to {100 * target:.0f}%", "load avg before -> after (per seed)"],
                [(name, " -> ".join(map(str, v["batches"])), f"{v['acc']:.2f} ± {v['acc_sd']:.2f}",
                  ", ".join(f"{f:.2f}" for f in v["finals"]), f"{v['time']:.1f} ± {v['time_sd']:.1f}",
                  f"{v['to_target']:.1f} ({v['reached']}/{v['n']})" if v["to_target"] else "not reached",
                  "; ".join(f"{a[0][0]} -> {a[1][0]}" for a in v["loads"]))
                 for name, v in summ.items() if v["n"]]), ""]
    a, f = summ.get("adabatch", {}), summ.get("fixed-small", {})
    if a.get("n") and f.get("n"):
        speedup = f["time"] / a["time"]
        pred_a = [predicted_seconds(x["records"], rate) for x in runs["adabatch"] if x["records"]]
        pred_f = [predicted_seconds(x["records"], rate) for x in runs["fixed-small"] if x["records"]]
        s += [f"**Speedup of AdaBatch over fixed-small at {slow}: {speedup:.2f}x** (goal >= 1.8x); "
              f"accuracy difference AdaBatch - fixed-small: **{a['acc'] - f['acc']:+.2f} points** (goal within 0.5)."]
        if a["to_target"] and f["to_target"]:
            s[-1] += f" Time to {100 * target:.0f}%: {f['to_target'] / a['to_target']:.2f}x faster."
        if None not in pred_a + pred_f and pred_a:
            predicted = statistics.mean(pred_f) / statistics.mean(pred_a)
            s[-1] += (f" Predicted from (f1)'s fixed-batch throughputs at {slow} (each epoch's samples at its "
                      f"batch's rate): {predicted:.2f}x; measured / predicted = **{speedup / predicted:.2f}** "
                      "(goal within 10%).")
        bound = stages / sum(2.0 ** -k for k in range(stages))
        s += ["", f"Bound for this schedule: with {stages} equal stages doubling from B0, even a purely "
                  f"communication-bound run is at most {stages} / {stages / bound:.4f} = {bound:.2f}x faster than "
                  "fixed-small.", ""]
    return s


def markdown_longer(res: dict, rate: dict, where: str) -> list:
    p = res["profile"]
    slow = p["bandwidths"][-1]
    return [f"### (f2b) More growth: 6 stages, 128 -> 4096, at {slow}", "",
            "The protocol of (f2) with one more stage: 6 epochs, AdaBatch 128 -> 4096 (one stage per epoch) against "
            f"fixed-small at 128 for the same 6 epochs; seeds {p['seeds']}, interleaved, {where}.", "",
            *versus(res["longer"], rate, p["target"], slow, 6)]


def markdown(res: dict) -> str:
    p, profile = res["profile"], res["profile_name"]
    slow = p["bandwidths"][-1]
    mb = res["grad_bytes"]
    s = ["## (f) Communication-bound: 2 hosts on a bandwidth-limited link", ""]
    if profile != "full":
        s += [f"**Reduced run** (`--profile {profile}`): fewer batches, seeds and LRs than the full section. "
              "The full run: `python benchmarks/commbound.py --profile full` (or `make bench`).", ""]
    s += ["Two hosts of the test cluster (`tests/cluster.py`: network namespaces on this machine, each with its own "
          "hostname and sshd, joined by veth cables to a bridge), one Horovod rank per host with 1 torch thread, "
          "`horovodrun -H node1:1,node2:1 --gloo` run from node1. Each cable is limited with `tc qdisc replace dev "
          "IF root tbf rate RATE burst 256kb latency 100ms` at both ends. fmnist_cnn has "
          f"{mb} bytes of float32 gradients; with N = 2 a ring allreduce moves bytes x 2(N-1)/N = {mb} bytes per "
          "rank per step each way. Both hosts share this machine's 2 cores (and other work on it: the load "
          "averages seen are in the tables).", "",
          table(["link (tbf rate)", "one TCP stream node1 -> node2, measured", "load avg (1, 5, 15 min) before -> after"],
                [(bw, f"{link['tcp_bits_per_second'] / 1e6:.0f} Mbit/s", f"{link['load'][0]} -> {link['load'][-1]}")
                 for bw, link in res["links"].items()]), ""]

    # f1
    s += ["### (f1) Throughput against global batch, and the physical limit", "",
          f"Fixed-batch trainer runs ({p['tp_samples']} samples per epoch, micro-batch cap {p['cap']} per worker; "
          f"the first epoch is warm-up, the median of the next {p['repeats']} is reported). The model: per step, "
          "compute = one worker's share of the batch at the throughput of one process on one host with the same "
          "per-worker batch and micro-batch (measured alone, 1 thread: "
          + ", ".join(f"{b}: {v:.0f}/s" for b, v in sorted(res["compute"].items())) + " samples/s), plus "
          "allreduce = bytes x 2(N-1)/N / bandwidth, the tbf rate (for 'unlimited', the TCP rate measured above).", ""]
    shared = res.get("compute_shared")
    if shared:
        s += ["The two hosts are namespaces on one machine and share its 2 cores, so a second model takes the "
              "compute measured with two such single-process runs started together on one host (per process: "
              + ", ".join(f"{b}: {v:.0f}/s" for b, v in sorted(shared.items())) + "); its fraction is "
              "`shared`. The first model is the goal's; the second separates what co-location costs from what the "
              "trainer and Horovod cost.", ""]
    head = ["global batch", "micro x accum"] + [f"{bw}: samples/s (model, measured/model{'; shared' if shared else ''})"
                                                for bw in res["links"]]
    rows, below = [], []
    points = {bw: {pt["global_batch"]: pt for pt in link["points"]} for bw, link in res["links"].items()}
    for b in p["batches"]:
        any_pt = next(pts[b] for pts in points.values())
        row = [b, f"{any_pt['micro_batch']} x {any_pt['accum_steps']}"]
        for bw, pts in points.items():
            m = model_rate(b, res["compute"], mb, bits_per_second(bw, res["links"]))
            frac = pts[b]["samples_per_second"] / m
            cell = f"{pts[b]['samples_per_second']:.0f} ({m:.0f}, **{frac:.2f}**"
            frac_shared = pts[b]["samples_per_second"] / model_rate(b, shared, mb, bits_per_second(bw, res["links"])) \
                if shared else None
            row.append(cell + (f"; {frac_shared:.2f})" if shared else ")"))
            if frac < 0.9:
                below.append((bw, b, frac, frac_shared))
        rows.append(row)
    s += [table(head, rows), "", "![throughput against batch per bandwidth](comm_throughput.png)", ""]
    ratio = {bw: pts[max(pts)]["samples_per_second"] / pts[min(pts)]["samples_per_second"] for bw, pts in points.items()}
    s += ["Throughput ratio largest / smallest batch: " + ", ".join(f"{bw} {v:.2f}x" for bw, v in ratio.items())
          + ".", ""]
    fracs = [pts[b]["samples_per_second"] / model_rate(b, res["compute"], mb, bits_per_second(bw, res["links"]))
             for bw, pts in points.items() for b in pts]
    s += [f"Measured / model over all {len(fracs)} points: median {statistics.median(fracs):.2f}, "
          f"min {min(fracs):.2f}, max {max(fracs):.2f}; {len(below)} below the 0.9 goal"
          + (": " + ", ".join(f"{bw} B={b} ({f:.2f}" + (f"; shared {fs:.2f})" if shared else ")")
                              for bw, b, f, fs in below) if below else "") + ".", ""]
    if shared:
        fs = [pts[b]["samples_per_second"] / model_rate(b, shared, mb, bits_per_second(bw, res["links"]))
              for bw, pts in points.items() for b in pts]
        s += [f"With the shared-core compute: median {statistics.median(fs):.2f}, min {min(fs):.2f}, "
              f"max {max(fs):.2f}; {sum(f < 0.9 for f in fs)} below 0.9.", ""]

    if res.get("decompose"):
        s += ["Where a step's time goes beyond the model, on one host (2 ranks, Horovod's example loop of (c), "
              f"{p['tp_samples']} samples per epoch, no micro-batch cap, the median of {p['repeats']} timed epochs): "
              "`independent` = each rank trains on its own slice with no communication (`worker.py minimal "
              "--plain`); `lockstep` = the same plus a 1-element allreduce after every step, so the ranks wait "
              "for each other but move no gradients (`--lockstep`); `allreduce` = Horovod's DistributedOptimizer. "
              "Samples/s of both ranks together:", "",
              table(["global batch", "independent", "lockstep", "allreduce", "lockstep / independent",
                     "allreduce / lockstep"],
                    [(b, *(f"{v[k]:.0f}" for k in DECOMPOSE), f"{v['lockstep'] / v['independent']:.2f}",
                      f"{v['allreduce'] / v['lockstep']:.2f}") for b, v in res["decompose"].items()]), ""]
        lock = [v["lockstep"] / v["independent"] for v in res["decompose"].values()]
        ar = [v["allreduce"] / v["lockstep"] for v in res["decompose"].values()]
        s += ["Reading the fractions: the model takes each rank's compute at the speed of a process that does not "
              "wait for anyone, and the link as the only thing the ranks share. Here the two hosts' ranks, "
              "Horovod's background threads, Gloo's transport and the kernel's veth traffic all run on the same "
              "2 cores, one rank per core. Ranks that wait for each other once per step lose what either loses to "
              f"the other threads (lockstep / independent: {min(lock):.2f}-{max(lock):.2f}), and moving the "
              f"gradients costs CPU on those cores (allreduce / lockstep: {min(ar):.2f}-{max(ar):.2f}). Neither "
              "is in the model, so where compute sets the pace (every batch on the fast links, the largest at the "
              "slow one) the measured points sit below it by about that product. Where the link sets the pace "
              "they can beat it, because Horovod allreduces the last layers' gradients while the backward pass is "
              "still computing the first ones, and the model adds the whole transfer after the compute.", ""]

    # f2, f2b
    target = p["target"]
    rate = {b: pt["samples_per_second"] for b, pt in points[slow].items()}
    subset = f", first {p['acc_samples']} training samples" if p["acc_samples"] else ""
    s += [f"### (f2) AdaBatch against fixed-small at {slow}", "",
          f"The protocol of (b) (Fashion-MNIST{subset}, "
          f"fmnist_cnn, 5 epochs = 5 stages, B0 = 128 doubling to 2048, lr 0.05 per 128 with linear scaling, "
          f"x0.375 per stage, 0.5-epoch warmup, micro-batch cap 256) through `launch/run-multinode.sh -H {HOSTS}` "
          f"at {slow}, seeds {p['seeds']}, AdaBatch and fixed-small interleaved seed by seed. Time is training time "
          f"(evaluation excluded); target accuracy {100 * target:.0f}%.", ""]
    s += versus(res["slow"], rate, target, slow, 5)
    if res.get("longer"):
        s += markdown_longer(res, rate, "on the same cluster and link, right after (f2)")

    # f3
    s += ["### (f3) The strongest baseline: fixed-large with gradual warmup", "",
          "Fixed global batch 2048, linear LR scaling from the per-128 LR, Goyal et al.'s gradual warmup "
          f"(linear from 0.1x over the first W epochs), x0.375 per epoch as in (b). Tuned on one host (2 processes) "
          f"over W in {p['warmups']} and LR per 128 samples in {p['warmup_lrs']} (seed {p['seeds'][0]}):", "",
          table(["lr per 128 (at 2048)", "warmup epochs", "final test acc %", "train seconds", "note"],
                [(f"{g['lr']} ({g['lr'] * 16:g})", g["warmup"],
                  f"{100 * g['records'][-1]['test_acc']:.2f}" if g["records"] and not g["error"] else "-",
                  f"{sum(e['epoch_seconds'] for e in g['records']):.1f}" if g["records"] else "-",
                  (g["error"] or "").split(";")[0]) for g in res["grid"]]), ""]
    if res["best"]:
        s += [f"Best: lr {res['best']['lr']} per 128, warmup {res['best']['warmup']} epochs. Compared with AdaBatch "
              "at equal wall-clock: the accuracy each had reached by the time the faster of the two finished "
              "(after the last epoch completed by then), and their final accuracies.", ""]
        rows = []
        for where, group in (("one host", res["one_host"]), (slow, res["slow"])):
            ada, large = summarize(group["adabatch"], target), summarize(group.get("fixed-large-warmup", []), target)
            if not (ada["n"] and large["n"]):
                continue
            budget = min(ada["time"], large["time"])
            at = {name: [acc_at(x["records"], budget) for x in group[key] if x["records"]]
                  for name, key in (("adabatch", "adabatch"), ("large", "fixed-large-warmup"))}
            fmt = lambda xs: ", ".join("-" if v is None else f"{100 * v:.2f}" for v in xs)  # noqa: E731
            rows.append((where, f"{ada['time']:.1f}", f"{large['time']:.1f}", f"{budget:.1f}", fmt(at["adabatch"]),
                         fmt(at["large"]), f"{ada['acc']:.2f}", f"{large['acc']:.2f}"))
        s += [table(["where", "AdaBatch train s", "fixed-large+warmup train s", "budget s", "AdaBatch acc % at budget",
                     "fixed-large acc % at budget", "AdaBatch final %", "fixed-large final %"], rows), ""]

    # f4
    s += [f"### (f4) Knobs that cut communication, at {slow}", "",
          f"Fixed-batch throughput ({p['knob_samples']} samples per epoch, warm-up epoch excluded) with each "
          f"setting; bytes per optimizer step counted at Horovod's `allreduce_async_` as in (e) (global batch 128, "
          f"one host): none {res['bytes']['none']}, fp16 {res['bytes']['fp16']}.", ""]
    rows = []
    for b in p["knob_batches"]:
        base = res["knobs"][f"default|{b}"]["samples_per_second"]
        for name in p["knobs"] or KNOBS:
            k = res["knobs"][f"{name}|{b}"]
            model = (f"{model_rate(b, res['compute'], mb, bits_per_second(slow, res['links']), 0.5 if 'fp16' in name else 1):.0f}"
                     if b // WORLD in res["compute"] else "-")
            rows.append((b, name, f"{k['samples_per_second']:.0f}", ", ".join(f"{x:.0f}" for x in k["repeats"]),
                         f"{k['samples_per_second'] / base:.2f}x", model, k["load"][0]))
    s += [table(["global batch", "setting", "samples/s", "samples/s of each timed epoch", "vs default", "model samples/s", "load avg"],
                rows), ""]
    s += ["Commands:", "", "```", *res["log"], "```", ""]
    return "\n".join(s)


def profile_parser(doc: str, profiles: dict, saved: str) -> argparse.ArgumentParser:
    """The flags of a section's driver (this one, growth_bench.py): --profile, --out, --reuse."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=list(profiles), default="full")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--reuse", action="store_true", help=f"rewrite the section from an earlier {saved}")
    return ap


def main():
    ap = profile_parser(__doc__, PROFILES, "commbound.json")
    ap.add_argument("--only", choices=["f2b"], help="measure only this part, into OUT/commbound-f2b.md (without "
                                                     "(f1)'s throughputs, so with no predicted speedup)")
    a = ap.parse_args()
    out = a.out.resolve()
    if a.only:
        res = measure_longer(a.profile, out, Runner())
        text = "\n".join(markdown_longer(res, {}, "on a cluster of its own (TCP "
                                         f"{res['tcp_bits_per_second'] / 1e6:.0f} Mbit/s)") +
                         ["Commands:", "", "```", *res["log"], "```", ""])
        (out / "commbound-f2b.md").write_text(text)
        print(out / "commbound-f2b.md")
        return
    if a.reuse:
        res = json.loads((out / "commbound.json").read_text())
        for key in ("compute", "compute_shared", "decompose"):
            if key in res:
                res[key] = {int(k): v for k, v in res[key].items()}
    else:
        from cluster import ClusterError

        try:
            res = measure(a.profile, out, Runner())
        except ClusterError as e:
            sys.exit(f"commbound: the 2-host test cluster cannot be made here: {e}")
    plot(res, out / "comm_throughput.png")
    (out / "commbound.md").write_text(markdown(res))
    print(out / "commbound.md")


if __name__ == "__main__":
    main()
