"""adabatch-report: plot one or more runs' metrics.jsonl into an image (AdaBatch vs fixed-batch).

A problem with the runs or the output path ends with one line on stderr and exit code 2. Lines of
metrics.jsonl that are not whole epoch records (a run killed mid-write) are skipped with a warning,
and a value that is missing or not a number leaves a gap in its curve. `-o` may name a directory
(the image is then DIR/report.png) or a file without a suffix (.png is added).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

from .errors import OneLineParser, UserError, one_line, print_error
from .rundir import CONFIG, METRICS, read_metrics

PANELS = (("test_acc", "test accuracy"), ("train_loss", "train loss"), ("global_batch", "global batch"),
          ("lr", "learning rate"))


def read_run(run_dir: Path) -> list:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{path} not found; is {run_dir} a run dir?")
    try:
        records = read_metrics(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not records:
        raise UserError(f"{path} has no epoch records yet")
    return records


def label(run_dir: Path) -> str:
    from .config import load_yaml

    try:
        mode = load_yaml(Path(run_dir) / CONFIG)["schedule"]["mode"]  # bounded in size and aliases
    except Exception:  # noqa: BLE001 - no readable config: the name alone
        mode = ""
    return f"{Path(run_dir).name} ({mode})" if isinstance(mode, str) and mode else Path(run_dir).name


def _number(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else math.nan


def output_path(out: Path) -> Path:
    """Where the image goes: DIR/report.png for a directory, NAME.png for a name without a suffix."""
    if out.is_dir():
        return out / "report.png"
    return out if out.suffix else out.with_name(out.name + ".png")


def plot(run_dirs, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_dir, read_run(run_dir)) for run_dir in run_dirs]
    out = output_path(Path(out))
    fig, axes = plt.subplots(2, len(PANELS), figsize=(4.2 * len(PANELS), 7), squeeze=False)
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        plt.close(fig)
        raise UserError(f"cannot write a '{out.suffix}' image ({out}); use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    for run_dir, records in runs:
        name = label(run_dir)
        epochs = [r["epoch"] + 1 for r in records]
        wall, t = [], 0.0
        for r in records:
            seconds = _number(r.get("epoch_seconds"))
            t += 0.0 if math.isnan(seconds) else seconds
            wall.append(t)
        for col, (key, title) in enumerate(PANELS):
            ys = [_number(r.get(key)) for r in records]
            axes[0][col].plot(epochs, ys, marker="o", ms=3, label=name)
            axes[1][col].plot(wall, ys, marker="o", ms=3, label=name)
            axes[0][col].set_title(title)
            axes[0][col].set_xlabel("epoch")
            axes[1][col].set_xlabel("training wall time (s)")
            if key in ("global_batch", "lr") and any(y > 0 for y in ys):
                for row in axes:
                    row[col].set_yscale("log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a log axis with nothing positive on it
            fig.tight_layout()
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or one_line(e)}") from None
    finally:
        plt.close(fig)
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="adabatch-report", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=Path("report.png"),
                   help="image to write (.png, .pdf, .svg, ...; a directory gets report.png)")
    args = p.parse_args(argv)
    try:
        print(plot(args.run_dirs, args.output))
    except UserError as e:
        print_error("adabatch-report", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
