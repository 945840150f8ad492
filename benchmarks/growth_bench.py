"""`make bench` section (j): growth decided by the gradient noise scale against hand-set timetables, on the
2-host test cluster at 100 Mbit/s (issue 20).

Arms, per model, with the protocol of (f2) (lr 0.05 per 128 with linear scaling, x0.375 per stage, 0.5-epoch
warmup, micro-batch cap 256, one rank per host, 1 thread), seeds interleaved:
  fixed-small     128 throughout
  timetable-iN    AdaBatch 128 doubling every N epochs up to 2048; N = 1 is the paper's timetable of (f2),
                  N in INTERVALS is the tuning of `interval`, and the best of them (final accuracy, then time)
                  is reported as "best timetable"
  noise           --mode noise with its defaults (noise_multiple 1, noise_checks 4, half-life 50,000
                  samples, measured every 8th step), 128 up to 2048, untuned per model; its LR decays every
                  epoch (the protocol's interval 1) as fixed-small's and the paper timetable's do
  noise-m0.25     (full and reduced profiles) the same with noise_multiple 0.25: a sensitivity arm, not the
                  goal's arm (grow while the next batch is at most 4 x B_noise)
Reported: final test accuracy, training seconds, seconds to the target accuracy, the growth points; plots of
test accuracy against training time, and of B_noise with the global batch against samples seen.

    python benchmarks/growth_bench.py [--profile full|reduced|smoke] [--out DIR]
writes DIR/growth.json, DIR/growth_*.png and prints the markdown section.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import table  # noqa: E402
from commbound import Runner, profile_parser, summarize, tcp_throughput  # noqa: E402

INTERVALS = [1, 2, 3]
PROFILES = {
    "full": dict(models=["fmnist_cnn", "mlp"], seeds=[0, 1, 2], epochs=5, samples=[], target=0.88, sensitivity=True),
    "reduced": dict(models=["fmnist_cnn", "mlp"], seeds=[0], epochs=5, samples=["--train-samples", 30000,
                                                                                  "--test-samples", 5000],
                    target=0.85, sensitivity=True),
    "smoke": dict(models=["mlp"], seeds=[0], epochs=2, samples=["--train-samples", 4096, "--test-samples", 1000],
                  target=0.5, sensitivity=False),
}
SENSITIVITY = 0.25  # the noise_multiple of the sensitivity arm


def arms(sensitivity: bool = False) -> dict:
    grow = ["--initial-batch", 128, "--max-batch", 2048]
    out = {"fixed-small": ["--mode", "fixed", "--initial-batch", 128]}
    out.update({f"timetable-i{n}": ["--mode", "adaptive", *grow, "--interval", n] for n in INTERVALS})
    out["noise"] = ["--mode", "noise", *grow]
    if sensitivity:
        out[f"noise-m{SENSITIVITY:g}"] = ["--mode", "noise", *grow, "--schedule.noise_multiple", SENSITIVITY]
    return out


def b_noise_curve(run_dir: Path) -> list:
    """(samples seen, B_noise) from TensorBoard's per-step noise/b_noise (tb/steps: on the samples-seen axis)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb" / "steps"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("noise/b_noise")] if "noise/b_noise" in acc.Tags()["scalars"] \
        else []


def measure(name: str, out: Path, only: list | None = None) -> dict:
    """Run the profile's arms (or only those named), seeds interleaved per model."""
    from cluster import Cluster

    p = PROFILES[name]
    r = Runner()
    work = out / "runs" / "growth"
    work.mkdir(parents=True, exist_ok=True)
    res = {"profile": p, "profile_name": name, "runs": {}}
    with Cluster(n_hosts=2) as c:
        for h in c.hosts:
            c.set_bandwidth(h, "100mbit")
        res["tcp_bits_per_second"] = tcp_throughput(c)
        for model in p["models"]:
            for s in p["seeds"]:
                for arm, flags in arms(p.get("sensitivity", False)).items():
                    if only and arm not in only:
                        continue
                    run_dir = work / f"{model}-{arm}-s{s}"
                    run = r.train(run_dir, [*flags, "--model", model, "--epochs", p["epochs"], *p["samples"],
                                            "--seed", s, "--log-every-steps", 10], c)
                    run["b_noise"] = b_noise_curve(run_dir) if run["records"] else []
                    res["runs"].setdefault(model, {}).setdefault(arm, []).append(run)
    res["log"] = r.log
    (out / "growth.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def plot(res: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model, runs in res["runs"].items():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, (arm, xs) in enumerate(runs.items()):
            for j, x in enumerate(xs):
                recs = x["records"]
                t = [sum(e["epoch_seconds"] for e in recs[: k + 1]) for k in range(len(recs))]
                ax.plot(t, [100 * e["test_acc"] for e in recs], "o-", color=f"C{i}", alpha=0.8,
                        label=arm if j == 0 else None)
                if x.get("b_noise"):
                    bx.plot(*zip(*x["b_noise"]), "-", color=f"C{i}", alpha=0.6, label=f"{arm}: B_noise" if j == 0
                            else None)
                seen = [sum(e["samples_used"] for e in recs[:k]) for k in range(len(recs) + 1)]
                bx.step(seen, [recs[0]["global_batch"]] + [e["global_batch"] for e in recs], "--", where="pre",
                        color=f"C{i}", alpha=0.6, label=f"{arm}: global batch" if j == 0 else None)
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{model}: accuracy against time, 2 hosts at 100mbit")
        bx.set_yscale("log", base=2)
        bx.set_xlabel("samples seen")
        bx.set_ylabel("B_noise / global batch")
        bx.set_title(f"{model}: noise scale and batch")
        for a in (ax, bx):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"growth_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(res: dict, pngs: list) -> str:
    p, name = res["profile"], res["profile_name"]
    target = p["target"]
    s = ["## (j) Growth from the gradient noise scale against hand-set timetables, at 100mbit", ""]
    if name != "full":
        s += [f"**{name.capitalize()} run** (`--profile {name}`: seeds {p['seeds']}, "
              f"{' '.join(map(str, p['samples'])) or 'all samples'}); the full protocol is `--profile full`.", ""]
    s += [f"The protocol of (f2) on two hosts at 100mbit (one TCP stream: {res['tcp_bits_per_second'] / 1e6:.0f} "
          f"Mbit/s), {p['epochs']} epochs, for each model: fixed-small (128), the paper's timetable (AdaBatch "
          f"doubling every epoch from 128 to 2048, = timetable-i1), the timetable tuned over `interval` in "
          f"{INTERVALS}, and `--mode noise` with its defaults, untuned"
          + (f" (and, as a sensitivity arm, with noise_multiple {SENSITIVITY:g})" if p.get("sensitivity") else "")
          + ". Time is training time (evaluation "
          f"excluded); target accuracy {100 * target:.0f}%; seeds {p['seeds']}.", ""]
    for model, runs in res["runs"].items():
        summ = {arm: summarize(xs, target) for arm, xs in runs.items()}
        tuned = [a for a in summ if a.startswith("timetable") and summ[a]["n"]]
        best = max(tuned, key=lambda a: (round(summ[a]["acc"], 1), -summ[a]["time"])) if tuned else None
        rows = []
        for arm, v in summ.items():
            if not v["n"]:
                rows.append((arm, "failed: " + "; ".join(map(str, v["errors"])), "", "", "", ""))
                continue
            growth = [[(g["epoch"], g["to_batch"], round(g["b_noise"])) for e in x["records"] for g in
                       ([e["growth"]] if e.get("growth") else [])] for x in runs[arm]]
            rows.append((arm + (" (best timetable)" if arm == best else ""), " -> ".join(map(str, v["batches"])),
                         f"{v['acc']:.2f} ± {v['acc_sd']:.2f}", f"{v['time']:.1f} ± {v['time_sd']:.1f}",
                         f"{v['to_target']:.1f} ({v['reached']}/{v['n']})" if v["to_target"] else "not reached",
                         "; ".join(", ".join(f"epoch {e}: -> {b} (B_noise {n})" for e, b, n in g) or "none"
                                   for g in growth) if arm.startswith("noise") else ""))
        s += [f"### {model}", "", table(["arm", "global batch by epoch (seed 0)", "final test acc %", "train seconds",
                                          f"seconds to {100 * target:.0f}%", "noise decisions (per seed)"], rows), ""]
        paper = summ.get("timetable-i1", {})
        for arm in (a for a in summ if a.startswith("noise")):
            n = summ[arm]
            if not (n.get("n") and paper.get("n")):
                continue
            verdict = ("reaches" if n["acc"] >= paper["acc"] - 0.3 else "misses") + \
                f" the paper timetable's accuracy within 0.3 points ({n['acc'] - paper['acc']:+.2f}) in " + \
                f"{n['time'] / paper['time']:.2f}x its training time"
            who = "Noise-driven growth" if arm == "noise" else f"The sensitivity arm ({arm}, tuned, not the goal's)"
            s += [f"{who} {verdict}."
                  + (f" Against the best timetable ({best}): {n['acc'] - summ[best]['acc']:+.2f} points, "
                     f"{n['time'] / summ[best]['time']:.2f}x the time." if best else ""), ""]
        for arm in (a for a in runs if a.startswith("noise")):
            bn = [e.get("b_noise") for x in runs[arm] for e in x["records"]]
            if any(v is not None for v in bn):
                s += [f"B_noise at each epoch's end ({arm} arm, seed by seed): " + "; ".join(
                    ", ".join(f"{e['b_noise']:.0f}" if e.get("b_noise") is not None else "-" for e in x["records"])
                    for x in runs[arm]) + ".", ""]
    s += [f"![{png.stem}]({png.name})" for png in pngs] + [""]
    s += ["Commands:", "", "```", *res["log"], "```", ""]
    return "\n".join(s)


def main():
    ap = profile_parser(__doc__, PROFILES, "DIR/growth.json")
    ap.add_argument("--arms", help="measure only these arms (comma-separated), e.g. noise,noise-m0.25")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res = json.loads((a.out / "growth.json").read_text()) if a.reuse else \
        measure(a.profile, a.out, a.arms.split(",") if a.arms else None)
    print(markdown(res, plot(res, a.out)))


if __name__ == "__main__":
    main()
