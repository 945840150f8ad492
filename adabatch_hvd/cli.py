"""Command-line entry points: adabatch-train (python -m adabatch_hvd) and adabatch-plan.

A mistake in the input ends with one line on stderr and exit code 2; a NaN/Inf loss with exit
code 3; a full disk with exit code 4; a stop request (SIGTERM, SIGUSR1; see signals.py) with a checkpoint
and exit code 75; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading

from . import config, phases, rundir, sampler, signals
from . import exitstatus
from .errors import (EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_LOST_PEERS, EXIT_NON_FINITE, EXIT_STOPPED, EXIT_USER,
                     DiskFull, NonFiniteLoss, UserError, print_error)


_parser, _overrides = config.parser, config.overrides  # (also read by the supervisor: exitstatus.run_dir_of)


def _setup_logging(rank) -> None:
    """Log lines carry the rank at the time of the line: an elastic reset can give a process another."""
    factory = logging.getLogRecordFactory()

    def record(*args, **kwargs):
        r = factory(*args, **kwargs)
        try:
            r.rank = rank()
        except ValueError:  # between Horovod's shutdown and init during an elastic reset
            r.rank = "?"
        return r

    logging.setLogRecordFactory(record)
    logging.basicConfig(level=os.environ.get("ADABATCH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


@exitstatus.recorded  # how this rank ended, for the launcher's supervisor (exitstatus.py)
def train_main(argv=None) -> int:
    """adabatch-train: run (or resume) an AdaBatch training job on every Horovod rank."""
    phases.mark("interpreter")  # Python's start and this module's imports (no torch yet)
    signals.install()  # first: a stop request during set-up stops the run at its first step
    _quiet_disk_full_threads()
    args = _parser("adabatch-train", "Train with AdaBatch adaptive batch sizes on Horovod.").parse_args(argv)
    prog = "adabatch-train"
    cfg = None
    try:
        cfg = config.from_args(args.config, _overrides(args))
        exitstatus.note(run_dir=cfg.run.run_dir)
        config.build_schedule(cfg)  # schedule errors before Horovod starts
        from . import dist

        phases.mark("import torch, horovod")
        threads = dist.init(cfg.run.threads, cfg.comm.horovod_env())
        phases.mark("horovod init")
        me = dist.rank()  # (Horovod may be shut down when it is needed below)
        exitstatus.note(rank=me, size=dist.size())
        _setup_logging(dist.rank)
        if threads.warning and dist.local_rank() == 0:  # once per host
            logging.getLogger("adabatch_hvd.dist").warning(threads.warning)
        try:
            trainer = _train(cfg, threads)
        except NonFiniteLoss as e:
            print_error(prog, e)
            exitstatus.note(message=str(e))
            return EXIT_NON_FINITE
        except dist.HorovodInternalError as e:  # not elastic: a rank or host was lost
            print(f"{prog}: error: rank {me} lost its peers ({_first_sentence(e)}); the job ends, and the same "
                  f"command with --resume auto continues from the last checkpoint written, if there is one",
                  file=sys.stderr)
            exitstatus.note(message=f"rank {me} lost its peers ({_first_sentence(e)})")
            return EXIT_LOST_PEERS
        if trainer.stop.agreed:
            if dist.is_main():
                print(f"{prog}: stopped on request ({trainer.stop.received or 'a signal to another rank'}) with "
                      f"a checkpoint in {trainer.ckpt_dir}; the same command with --resume auto continues",
                      file=sys.stderr)
            exitstatus.note(message=f"stopped on request ({trainer.stop.received or 'a signal to another rank'})")
            return EXIT_STOPPED
    except UserError as e:
        print_error(prog, e)
        exitstatus.note(message=str(e))
        return EXIT_USER
    except OSError as e:
        if not isinstance(e, DiskFull) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = e if isinstance(e, DiskFull) else DiskFull(e.filename or (cfg.run.run_dir if cfg else "."))
        print_error(prog, full)
        exitstatus.note(message=str(full))
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _train(cfg: config.Config, threads):
    from .trainer import Trainer

    phases.mark("import trainer")
    trainer = Trainer(cfg, threads)
    trainer.fit()  # gives the run dir back; a start that fails before its first step leaves nothing there
    if trainer.main and trainer.trained:  # rank 0 of a start that trained: where its time went
        phases.mark("finish")
        phases.record(trainer.run_dir / rundir.TIMING, world_size=trainer.world)
    return trainer


def _quiet_disk_full_threads() -> None:
    """A full disk also fails TensorBoard's writer thread; the main thread reports it in one line (exit 4),
    so the thread's traceback is left out."""
    default = threading.excepthook

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT)):
            default(args)

    threading.excepthook = hook


def _first_sentence(e: Exception) -> str:
    """'Read error [10.0.0.2]:34982: Connection reset by peer' from Horovod's and Gloo's long messages
    ('[/path/pair.cc:589] Read error ...', 'Horovod has been shut down. This was caused by ...')."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def plan_table(cfg: config.Config, world_size: int, num_samples: int) -> str:
    """The per-stage table: epochs, batches, micro-batching, LR and optimizer steps per epoch."""
    schedule = config.build_schedule(cfg)
    noise = schedule.mode == "noise"
    if noise:  # the stages it can reach, one an epoch (each row's epochs are decided at run time)
        while schedule.can_grow(len(schedule.grown) + 1):
            schedule = schedule.grow_at(len(schedule.grown) + 1)
    plans = schedule.plan(world_size, cfg.schedule.max_micro_batch, even=not cfg.run.elastic)
    head = ("stage", "epochs", "global", "per-worker", "micro", "accum", "lr", "steps/epoch")
    rows = []
    for p in plans:
        if rows and rows[-1][0] == p.stage:
            rows[-1][1][1] = p.epoch
            continue
        steps = len(sampler.steps(num_samples, p.global_batch, world_size))
        auto = cfg.schedule.max_micro_batch == "auto"  # chosen while training
        rows.append([p.stage, [p.epoch, p.epoch], p.global_batch, p.per_worker_batch, "auto" if auto else p.micro_batch,
                     "auto" if auto else p.accum_steps, f"{p.lr:.5g}", steps])
    cells = [[str(r[0]), "run time" if noise else f"{r[1][0]}-{r[1][1]}", *map(str, r[2:])] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in cells]
    s = cfg.schedule
    title = (f"{cfg.model.name} on {cfg.data.name} ({num_samples} samples), {world_size} workers, "
             f"mode={s.mode}, scaling={s.scaling}, lr_decay={s.lr_decay}, max_micro_batch={s.max_micro_batch}")
    if s.warmup_epochs:
        title += f", warmup {s.warmup_epochs} epochs (stage 0 lr is the warmup start)"
    if noise:
        lines.append(f"decided at run time: when each stage starts (at an epoch's end, once the smoothed gradient "
                     f"noise scale has been >= {s.noise_multiple:g} x the next global batch for {s.noise_checks} "
                     f"checks in a row, 4 per epoch, after {s.noise_half_life:g} samples; measured on 1 step "
                     f"in {s.noise_every}); bounds: stage 0 from epoch "
                     f"0, at most one growth per epoch, {len(rows) - 1} growth(s) at most "
                     f"(max_batch={s.max_batch}), never shrinking; the lr column is a stage's first LR if it starts "
                     f"at the earliest epoch: it decays x{s.lr_decay:g} every {s.interval} epoch(s) whether the "
                     f"batch grew or not")
    return "\n".join([title, *lines])


def plan_main(argv=None) -> int:
    """adabatch-plan: print the per-stage table for a config and world size, without training."""
    p = _parser("adabatch-plan", "Print the AdaBatch stage table for a config, without training.")
    p.add_argument("--world-size", "-n", type=int, default=1, help="number of Horovod workers")
    p.add_argument("--num-samples", type=int, default=None, help="training-set size (default: the data set's)")
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args.config, _overrides(args))
        known = config.DATA_SETS.get(cfg.data.name)  # the registry's size: no data on disk needed
        n = args.num_samples or (known and known.train_size) or cfg.data.synthetic_samples
        if n <= 0:
            raise UserError(f"--num-samples must be > 0, got {n}")
        print(plan_table(cfg, args.world_size, n))
    except UserError as e:
        print_error("adabatch-plan", e)
        return EXIT_USER
    return 0


def main() -> None:
    sys.exit(train_main())
