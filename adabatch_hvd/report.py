"""adabatch-report: plot one or more runs' metrics.jsonl into a PNG (AdaBatch vs fixed-batch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = (("test_acc", "test accuracy"), ("train_loss", "train loss"), ("global_batch", "global batch"),
          ("lr", "learning rate"))


def read_run(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise SystemExit(f"adabatch-report: error: {path} not found; is {run_dir} a run dir?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"adabatch-report: error: cannot read {path}: {e}") from None


def label(run_dir: Path) -> str:
    cfg = Path(run_dir) / "config.yaml"
    mode = ""
    if cfg.exists():
        import yaml

        mode = (yaml.safe_load(cfg.read_text()) or {}).get("schedule", {}).get("mode", "")
    return f"{Path(run_dir).name} ({mode})" if mode else Path(run_dir).name


def plot(run_dirs, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(PANELS), figsize=(4.2 * len(PANELS), 7), squeeze=False)
    for run_dir in run_dirs:
        records = read_run(run_dir)
        if not records:
            raise SystemExit(f"adabatch-report: error: {run_dir}/metrics.jsonl has no records yet")
        epochs = [r["epoch"] + 1 for r in records]
        wall, t = [], 0.0
        for r in records:
            t += r["epoch_seconds"] or 0.0
            wall.append(t)
        for col, (key, title) in enumerate(PANELS):
            ys = [r[key] for r in records]
            axes[0][col].plot(epochs, ys, marker="o", ms=3, label=label(run_dir))
            axes[1][col].plot(wall, ys, marker="o", ms=3, label=label(run_dir))
            axes[0][col].set_title(title)
            axes[0][col].set_xlabel("epoch")
            axes[1][col].set_xlabel("training wall time (s)")
            if key in ("global_batch", "lr"):
                for row in axes:
                    row[col].set_yscale("log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adabatch-report", description=__doc__)
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=Path("report.png"), help="PNG to write")
    args = p.parse_args(argv)
    print(plot(args.run_dirs, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
