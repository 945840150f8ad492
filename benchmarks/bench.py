"""`make bench` / `make bench-quick`: measure adabatch-hvd under horovodrun and write RESULTS.md.

  (a) throughput vs global batch (fmnist_cnn on Fashion-MNIST, resnet20 on CIFAR-shaped synthetic)
  (b) accuracy and wall-clock: AdaBatch vs fixed-small (B0) vs fixed-large (Bmax), several seeds
  (c) trainer overhead against a minimal hand-written Horovod loop
  (d) cost of stage changes: the AdaBatch run against the stage-weighted ideal from (a)
  (e) gradient allreduce calls and bytes per optimizer step in every stage
  plus a torch.profiler breakdown of where an optimizer step's time goes on this CPU, and
  (f) the communication-bound regime: 2 test-cluster hosts on tbf-limited links (benchmarks/commbound.py)
  (g) the ImageNet data path against the torchvision idiom (benchmarks/datapath.py)
  (h) the GPU check (benchmarks/gpu_check.sh), or why it did not run

--only f,g,h re-measures just those sections and replaces them in an existing RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

ACC_COMMON = ["--config", "configs/fashion_mnist.yaml", "--interval", "1", "--max-micro-batch", "256",
              "--reference-batch", "128", "--lr", "0.05", "--warmup-epochs", "0.5", "--quiet", "true"]
RUNS = {  # name -> extra flags; the same LR rule and decay, only the batch schedule differs
    "adabatch": ["--mode", "adaptive", "--initial-batch", "128", "--max-batch", "2048"],
    "fixed-small": ["--mode", "fixed", "--initial-batch", "128"],
    "fixed-large": ["--mode", "fixed", "--initial-batch", "2048"],
    # lr 0.05 x 2048/128 = 0.8 diverges for this CNN; this baseline keeps lr 0.05 at B = 2048
    "fixed-large-unscaled": ["--mode", "fixed", "--initial-batch", "2048", "--scaling", "none"],
}

PROFILES = {
    "full": dict(
        np=2, tp_batches=[32, 64, 128, 256, 512, 1024, 2048, 4096], tp_cap=256, tp_samples=16384, repeats=3,
        rn_batches=[32, 128, 512, 4096], rn_cap=128, rn_samples=4096, rn_repeats=2,
        seeds=[0, 1, 2], acc_epochs=5, acc_samples=None, target=0.88, runs=list(RUNS),
        oh_batch=128, oh_samples=20000, oh_pairs=2, comm_samples=8192, prof_batches=[128, 2048], prof_steps=10,
        commbound="full", datapath=["--images", 1600, "--rounds", 3, "--epochs", 2]),
    "quick": dict(
        np=2, tp_batches=[32, 512, 4096], tp_cap=256, tp_samples=4096, repeats=1,
        rn_batches=[32, 512], rn_cap=128, rn_samples=512, rn_repeats=1,
        seeds=[0], acc_epochs=5, acc_samples=2048, target=0.70, oh_pairs=1,
        runs=["adabatch", "fixed-small", "fixed-large"],
        oh_batch=128, oh_samples=4096, comm_samples=2048, prof_batches=[128], prof_steps=3,
        commbound="smoke", datapath=["--images", 128, "--rounds", 1, "--epochs", 1, "--serial-images", 32]),
}


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMP_NUM_THREADS="1")
    return e


def hvd(np_, args, log, check=True):
    cmd = [str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, *map(str, args)]
    log.append(" ".join(shlex.quote(c) for c in cmd).replace(str(BIN) + "/", ".venv/bin/").replace(str(ROOT) + "/", ""))
    print(f"$ {log[-1]}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode and check:
        sys.exit(f"bench: command failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    errors = [l.split("error: ", 1)[1] for l in proc.stderr.splitlines() if "adabatch-train: error:" in l]
    return errors[0] if proc.returncode and errors else None


def worker(p, mode, out, *args, log, reuse=False):
    if not (reuse and Path(out).exists()):
        hvd(p["np"], [ROOT / "benchmarks/worker.py", mode, out, *args], log)
    else:
        log.append(f"(reused {Path(out).name} from an earlier invocation)")
    return json.loads(Path(out).read_text())


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def machine() -> str:
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor())
    import horovod
    import torch

    return (f"- CPU: {model}, {os.cpu_count()} cores visible; {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM; no GPU\n"
            f"- Python {platform.python_version()}, torch {torch.__version__}, horovod {horovod.__version__} (Gloo), "
            f"{platform.platform()}\n- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} UTC")


def table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_throughput(curves, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items()):
        xs = [pt["global_batch"] for pt in c["points"]]
        ax.plot(xs, [pt["samples_per_second"] for pt in c["points"]], marker="o")
        for pt in c["points"]:
            if pt["accum_steps"] > 1:
                ax.annotate(f"x{pt['accum_steps']}", (pt["global_batch"], pt["samples_per_second"]), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch (xk = k accumulated micro-batches)")
        ax.set_ylabel("training samples/s (2 ranks)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="the reduced version of every section (several minutes; (f) needs root for the test cluster)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="where RESULTS.md and PNGs go")
    ap.add_argument("--reuse-throughput", action="store_true",
                    help="reuse (a)'s results from an earlier invocation in the same --out (they take ~10 minutes)")
    ap.add_argument("--only", type=lambda v: v.split(","), default=None, metavar="f,g,h,i,j",
                    help="measure only these of the sections (f) (g) (h) (i) (j) and replace them in OUT/RESULTS.md")
    ap.add_argument("--commbound-profile", choices=["full", "reduced", "smoke"], default=None,
                    help="size of section (f) (default: full, smoke with --quick)")
    a = ap.parse_args()
    p = PROFILES["quick" if a.quick else "full"]
    out = a.out.resolve()
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    if a.only:
        splice(out / "RESULTS.md", later_sections(a, p, out, a.only))
        print(out / "RESULTS.md")
        return
    log: list = []
    t_start = time.perf_counter()

    # (a) throughput curves
    fm = worker(p, "throughput", work / "tp_fmnist.json", "--batches", ",".join(map(str, p["tp_batches"])),
                "--cap", p["tp_cap"], "--samples", p["tp_samples"], "--repeats", p["repeats"], log=log,
                reuse=a.reuse_throughput)
    rn = worker(p, "throughput", work / "tp_resnet20.json", "--model", "resnet20", "--data", "synthetic",
                "--batches", ",".join(map(str, p["rn_batches"])), "--cap", p["rn_cap"], "--samples", p["rn_samples"],
                "--repeats", p["rn_repeats"], log=log, reuse=a.reuse_throughput)
    curves = {"fmnist_cnn on Fashion-MNIST": fm, "resnet20 on CIFAR-shaped synthetic": rn}
    plot_throughput(curves, out / "throughput.png")

    # (b) accuracy and wall clock
    acc = {name: [] for name in p["runs"]}
    for seed in p["seeds"]:
        for name in p["runs"]:
            flags = RUNS[name]
            run_dir = work / f"{name}-seed{seed}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            extra = ["--train-samples", p["acc_samples"]] if p["acc_samples"] else []
            error = hvd(p["np"], ["-m", "adabatch_hvd", *ACC_COMMON, *flags, "--epochs", p["acc_epochs"], "--seed",
                                  seed, "--run-dir", run_dir, *extra], log, check=False)
            acc[name].append({"records": records(run_dir) if (run_dir / "metrics.jsonl").exists() else [],
                              "error": error})
    from adabatch_hvd.report import plot

    plot([work / f"{name}-seed{p['seeds'][0]}" for name in p["runs"] if acc[name][0]["records"]], out / "accuracy.png")

    # (c) overhead against a minimal Horovod loop, same batch, model, data and augmentation
    common = ["--batches", p["oh_batch"], "--samples", p["oh_samples"], "--repeats", p["repeats"]]
    pairs = [(worker(p, "throughput", work / f"oh_trainer{i}.json", *common, log=log),
              worker(p, "minimal", work / f"oh_minimal{i}.json", *common, log=log)) for i in range(p["oh_pairs"])]

    # (e) communication per step, (f) profile
    comm = worker(p, "comm", work / "comm.json", "--batches", 128, "--cap", 64, "--samples", p["comm_samples"],
                  "--epochs", 5, "--interval", 1, log=log)
    prof = worker(p, "profile", work / "profile.json", "--batches", ",".join(map(str, p["prof_batches"])),
                  "--cap", p["tp_cap"], "--steps", p["prof_steps"], log=log)

    write_results(a, p, out, curves, acc, pairs, comm, prof, log,
                  time.perf_counter() - t_start)
    splice(out / "RESULTS.md", later_sections(a, p, out, ["f", "g", "h", "i", "j"]))
    print(out / "RESULTS.md")


def later_sections(a, p, out, which) -> dict:
    """{heading: markdown} of sections (f) communication-bound, (g) data path, (h) GPU, (i) against
    Lightning, (j) noise-scale growth, each measured by its own script (they need a cluster, generated
    JPEGs, a GPU), with the load average seen."""
    sections = {}
    if "f" in which:
        profile = a.commbound_profile or p["commbound"]
        cmd = [sys.executable, ROOT / "benchmarks/commbound.py", "--profile", profile, "--out", out]
        subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env(), check=True)
        sections["## (f)"] = (out / "commbound.md").read_text()
    if "g" in which:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import datapath

        args = [out / "runs" / "datapath.json", *p["datapath"]]
        command = "python benchmarks/datapath.py OUT.json " + " ".join(map(str, p["datapath"]))
        subprocess.run([sys.executable, ROOT / "benchmarks/datapath.py", *map(str, args)], cwd=ROOT, env=env(),
                       check=True)
        sections["## (g)"] = datapath.markdown(json.loads(Path(args[0]).read_text()), command)
    if "h" in which:
        sections["## (h)"] = gpu_section()
    scripts = {"i": ("peers.py", ["--smoke", "--seeds", "0"] if a.quick else []),
               "j": ("growth_bench.py", ["--profile", "smoke" if a.quick else "full"])}
    for key in [k for k in scripts if k in which]:
        script, args = scripts[key]
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)], cwd=ROOT,
                              env=env(), check=True, stdout=subprocess.PIPE, text=True)
        sections[f"## ({key})"] = proc.stdout
    return sections


def gpu_section() -> str:
    head = "## (h) GPU: the NCCL build and throughput against plain PyTorch"
    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout if shutil.which(
        "nvidia-smi") else ""
    if "GPU" not in gpus:
        return (f"{head}\n\nNot run: no NVIDIA GPU is visible on the machine that ran this benchmark "
                "(`nvidia-smi -L` lists none). On a GPU machine (no registry needed: `benchmarks/gpu/fill.sh` "
                "fills what it carries), `benchmarks/gpu_check.sh` builds Horovod with NCCL against the torch found "
                "there, measures resnet20 and resnet50 (ImageNet-shaped, synthetic) at fp32 and bf16 against a "
                "plain PyTorch loop at the same micro-batch and precision (goal >= 0.9), survives a real CUDA "
                "out-of-memory with `--max-micro-batch auto`, and compares bf16 with fp32 on a short Fashion-MNIST "
                "run; it appends its own section here. No GPU figures are reported in this file.\n")
    return (f"{head}\n\nA GPU is visible ({gpus.strip().splitlines()[0]}): run `benchmarks/gpu_check.sh`, which "
            "appends its section below (it takes about 10 minutes, most of it building Horovod with NCCL).\n")


def splice(path: Path, sections: dict) -> None:
    """Put each '## (x)' section into RESULTS.md: in place of the old one, or before '## Commands run'."""
    parts = re.split(r"(?m)^(?=## )", path.read_text() if path.exists() else "")
    for head, body in sections.items():
        body = body.rstrip("\n") + "\n\n"
        at = next((i for i, part in enumerate(parts) if part.startswith(head)), None)
        if at is None:
            at = next((i for i, part in enumerate(parts) if part.startswith("## Commands run")), len(parts))
            parts.insert(at, body)
        else:
            parts[at] = body
    path.write_text("".join(parts))


def mean_sd(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_results(a, p, out, curves, acc, overhead, comm, prof, log, seconds):
    s = [f"# adabatch-hvd benchmark results{' (quick)' if a.quick else ''}", "",
         "Measured on this machine, 2 Horovod ranks (`horovodrun -np 2 -H localhost:2 --gloo`), 1 torch thread per "
         "rank, CPU only:", "", machine(), "",
         f"Command: `{'make bench-quick' if a.quick else 'make bench'}` (`python benchmarks/bench.py"
         f"{' --quick' if a.quick else ''}`), {seconds / 60:.1f} minutes in all.", ""]

    s += ["## (a) Throughput against global batch", "",
          "Trainer samples/s in fixed-batch mode; the first epoch of each point is warm-up and excluded, the figure "
          "is the median of the remaining epochs. Above the per-worker cap the batch is accumulated (x k).", ""]
    for name, c in curves.items():
        s += [f"**{name}** (per-worker micro-batch cap {c['cap']}, {c['samples']} samples per epoch)", "",
              table(["global batch", "micro x accum (per worker)", "samples/s", "epochs timed (samples/s)"],
                    [(pt["global_batch"], f"{pt['micro_batch']} x {pt['accum_steps']}",
                      f"{pt['samples_per_second']:.0f}", ", ".join(f"{r:.0f}" for r in pt["repeats"]))
                     for pt in c["points"]]), ""]
    s += ["![throughput](throughput.png)", ""]

    # (b)
    target = p["target"]
    rows, wall, final = [], {}, {}
    for name, runs in acc.items():
        done = [r["records"] for r in runs if not r["error"]]
        failed = [r["error"] for r in runs if r["error"]]
        if not done:
            rows.append((name, "-", "diverged", "-", "-", "-"))
            continue
        finals = [r[-1]["test_acc"] * 100 for r in done]
        times = [sum(e["epoch_seconds"] for e in r) for r in done]
        to_target = [next((sum(e["epoch_seconds"] for e in r[:i + 1]) for i, e in enumerate(r)
                           if e["test_acc"] >= target), None) for r in done]
        (m, sd), (tm, tsd) = mean_sd(finals), mean_sd(times)
        wall[name], final[name] = tm, m
        reached = [x for x in to_target if x is not None]
        rows.append((name, " -> ".join(str(e["global_batch"]) for e in done[0]), f"{m:.2f} ± {sd:.2f}",
                     ", ".join(f"{f:.2f}" for f in finals) + (f"; {len(failed)} diverged" if failed else ""),
                     f"{tm:.1f} ± {tsd:.1f}",
                     f"{statistics.mean(reached):.1f} ({len(reached)}/{len(done)} runs)" if reached else "not reached"))
    diverged = sorted({f"{name}: {r['error'].split(';')[0]}" for name, runs in acc.items() for r in runs
                       if r["error"]})
    n = acc["adabatch"][0]["records"]
    subset = f" (first {p['acc_samples']} training samples)" if p["acc_samples"] else ""
    s += ["## (b) Accuracy and wall-clock: AdaBatch against fixed batches", "",
          f"Fashion-MNIST{subset}, "
          f"fmnist_cnn, {len(n)} epochs = {len(n)} stages of 1 epoch (the paper's protocol scaled down: B0 = 128 "
          f"doubling to 2048), seeds {p['seeds']}. All runs use the same LR rule: lr 0.05 per 128 samples with "
          "linear scaling, x0.375 step decay at every stage boundary, a 0.5-epoch warmup and a per-worker "
          "micro-batch cap of 256; only the batch schedule differs (`fixed-large-unscaled` keeps lr 0.05 at "
          "B = 2048, `--scaling none`). Wall-clock is training time (evaluation excluded), summed over epochs.", "",
          table(["run", "global batch by epoch", "final test acc % (mean ± sd)", "per seed", "train seconds",
                 f"seconds to {target:.0%} test acc"], rows), ""]
    if diverged:
        s += ["Runs stopped by the NaN guard (exit code 3): " + "; ".join(f"`{d}`" for d in diverged), ""]
    s += [f"AdaBatch speedup over fixed-small at the same epoch count: "
          f"**{wall['fixed-small'] / wall['adabatch']:.2f}x**; accuracy difference AdaBatch - fixed-small: "
          f"**{final['adabatch'] - final['fixed-small']:+.2f} points**.", "", "![accuracy](accuracy.png)", ""]

    # (c)
    ratios = [t["points"][0]["samples_per_second"] / m["samples_per_second"] for t, m in overhead]
    s += ["## (c) Overhead against a minimal Horovod loop", "",
          f"Global batch {p['oh_batch']} (no accumulation), fmnist_cnn, Fashion-MNIST ({p['oh_samples']} samples "
          "per epoch), the same data pipeline and augmentation. The minimal loop is Horovod's PyTorch example "
          "pattern: slice, forward, backward, `DistributedOptimizer.step()`. Pairs are run interleaved.", "",
          table(["pair", "trainer samples/s", "minimal loop samples/s", "trainer / minimal"],
                [(i + 1, f"{t['points'][0]['samples_per_second']:.0f}", f"{m['samples_per_second']:.0f}", f"{r:.3f}")
                 for i, ((t, m), r) in enumerate(zip(overhead, ratios))]), "",
          f"Mean throughput ratio: **{statistics.mean(ratios):.3f}** (overhead {100 * (1 - statistics.mean(ratios)):+.1f}%).", ""]

    # (d)
    fm = curves["fmnist_cnn on Fashion-MNIST"]["points"]
    rate = {pt["global_batch"]: pt["samples_per_second"] for pt in fm}
    d_rows, ratios_d = [], []
    for runs in (r["records"] for r in acc["adabatch"]):
        actual = sum(e["epoch_seconds"] for e in runs)
        samples = [e["epoch_seconds"] * e["samples_per_second"] for e in runs]
        if all(e["global_batch"] in rate for e in runs):
            ideal = sum(n_ / rate[e["global_batch"]] for n_, e in zip(samples, runs))
            ratios_d.append(actual / ideal)
            d_rows.append((len(d_rows), f"{actual:.1f}", f"{ideal:.1f}", f"{actual / ideal:.3f}"))
    s += ["## (d) Cost of stage changes", "",
          "The AdaBatch run's training time against the ideal: for every epoch, its samples divided by the "
          "fixed-batch throughput at that epoch's batch from (a).", ""]
    if d_rows:
        s += [table(["seed run", "AdaBatch train seconds", "stage-weighted ideal", "ratio"], d_rows), "",
              f"Mean ratio: **{statistics.mean(ratios_d):.3f}**.", ""]
    else:
        s += ["(a) did not measure every batch of (b) in this profile.", ""]

    # (e)
    s += ["## (e) Communication per optimizer step", "",
          f"Counted at Horovod's `allreduce_async_` inside `DistributedOptimizer` during an AdaBatch run "
          f"(fmnist_cnn, {comm['parameters']} parameter tensors, {comm['parameter_bytes']} bytes of gradients; "
          f"micro-batch cap 64 per worker, so k grows with the batch).", "",
          table(["stage", "global batch", "accum steps k", "backward passes/step", "optimizer steps",
                 "allreduce calls/step", "bytes/step", "bytes/sample"],
                [(st["stage"], st["global_batch"], st["accum_steps"], st["backward_passes"], st["optimizer_steps"],
                  st["allreduce_calls_per_step"], st["bytes_per_step"], f"{st['bytes_per_sample']:.0f}")
                 for st in comm["stages"]]), "",
          "One allreduce per parameter tensor per optimizer step at every k; the bytes per sample halve with "
          "each doubling of the batch. (Besides these, each step's stop flag rides in the gradients' fused "
          "allreduce, and each epoch allreduces 3 numbers of training metrics and 3 of evaluation metrics.)", ""]

    # profile
    s += ["## Where the time goes (torch.profiler, rank 0)", "",
          f"{prof['steps']} optimizer steps of fmnist_cnn at each batch; self CPU time by operator group. "
          "`Optimizer.step` includes Horovod's `synchronize()`, i.e. the wait for the gradient allreduce.", ""]
    groups = list(next(iter(prof["profiles"].values()))["shares"])
    s += [table(["group"] + [f"B={b}" for b in prof["profiles"]],
                [(g, *(f"{100 * v['shares'][g]:.1f}%" for v in prof["profiles"].values())) for g in groups]), ""]
    for b, v in prof["profiles"].items():
        s += [f"Top operators at B={b}: " + ", ".join(f"`{k}` {100 * x:.1f}%" for k, x in v["top"]), ""]

    shares = [(e["epoch"], e["global_batch"], e["accum_steps"], f"{e['samples_per_second']:.0f}",
               f"{100 * e['allreduce_wait_share']:.1f}%") for e in acc["adabatch"][0]["records"]]
    s += ["Per epoch of the first AdaBatch run in (b): share of step time spent in `optimizer.step()` "
          "(waiting for the allreduce, plus the SGD update):", "",
          table(["epoch", "global batch", "accum", "samples/s", "step() share"], shares), ""]
    s += ["## Commands run", "", "```", *log, "```", ""]
    (out / "RESULTS.md").write_text("\n".join(s))


if __name__ == "__main__":
    main()
