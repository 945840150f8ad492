"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing saved is lost."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, horovodrun, hvd_env

TINY = ["--data.name", "synthetic", "--synthetic-samples", "64", "--synthetic-shape", "1,8,8", "--model.name", "mlp",
        "--epochs", "1", "--initial-batch", "16", "--quiet", "true"]


def train(*args, cwd=ROOT, prog="adabatch_hvd"):
    return subprocess.run([sys.executable, "-m", prog, *map(str, args)], cwd=cwd, env=hvd_env(),
                          capture_output=True, text=True, timeout=300)


def plan(*args):
    return subprocess.run([sys.executable, "-c", "import sys; from adabatch_hvd.cli import plan_main; "
                           "sys.exit(plan_main())", *map(str, args)], cwd=ROOT, env=hvd_env(),
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, message, prog="adabatch-train"):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "broken.yaml").write_text("schedule: [unclosed\n")
    (d / "typo.yaml").write_text("schedule:\n  intial_batch: 64\n")
    (d / "section.yaml").write_text("schedul:\n  epochs: 3\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "badtype.yaml").write_text("schedule:\n  epochs: many\n")
    return d


CASES = {
    "zero batch": (["--initial-batch", "0"], "schedule.initial_batch must be > 0, got 0"),
    "negative batch": (["--initial-batch", "-8"], "schedule.initial_batch must be > 0, got -8"),
    "growth factor 1": (["--growth-factor", "1"], "schedule.growth_factor must be > 1"),
    "growth factor 0.5": (["--growth-factor", "0.5"], "schedule.growth_factor must be > 1"),
    "max below initial": (["--max-batch", "64"], "schedule.max_batch 64 is below the initial batch 128"),
    "cap that divides nothing": (["--initial-batch", "512", "--max-micro-batch", "100"],
                                 "per-worker batch 512 (global 512 / 1 workers, epoch 0) does not split into 6"),
    "zero cap": (["--max-micro-batch", "0"], "max micro-batch must be > 0"),
    "lr zero": (["--lr", "0"], "optim.lr must be a finite number > 0, got 0.0"),
    "lr negative": (["--lr", "-0.1"], "optim.lr must be a finite number > 0, got -0.1"),
    "epochs zero": (["--epochs", "0"], "schedule.epochs must be > 0, got 0"),
    "epochs negative": (["--epochs", "-3"], "schedule.epochs must be > 0, got -3"),
    "epochs not a number": (["--epochs", "ten"], "schedule.epochs: expected int, got 'ten'"),
    "unknown scaling": (["--scaling", "cubic"], "unknown schedule.scaling 'cubic' (the LR scaling rule)"),
    "unknown mode": (["--mode", "grow"], "unknown schedule.mode 'grow'"),
    "bad stage": (["--stages", "0:128,20"], "bad stage '20'"),
    "momentum": (["--momentum", "1.5"], "momentum must be in [0, 1)"),
    "unknown compression": (["--compression", "fp8"], "unknown comm.compression 'fp8' (did you mean 'fp16'?)"),
    "cycle time zero": (["--cycle-time-ms", "0"], "comm.cycle_time_ms must be a number > 0, got 0.0"),
    "unknown flag": (["--epochz", "3"], "unrecognized arguments: --epochz 3"),
    "unknown data set": (["--data.name", "cifar11"], "did you mean 'cifar10'?"),
    "unknown model": (["--model.name", "resnet-20"], "did you mean 'resnet20'?"),
    "missing cifar dir": (["--data.name", "cifar10", "--data.root", "/nonexistent/cifar"],
                          "cifar-10-python.tar.gz"),
    "missing config file": (["--config", "/nonexistent/x.yaml"], "config file not found: /nonexistent/x.yaml"),
    "unreadable config": (["--config", "/"], "cannot read config file /"),
    "run dir not writable": (["--run-dir", "/proc/adabatch"], "cannot create run dir /proc/adabatch"),
    "resume without checkpoint": (["--resume"], "holds no run to continue (no checkpoint in"),
    "run dir of another run": (["--run-dir", "runs/.test-existing"], "runs/.test-existing holds a run that cannot be "
                               "continued (records of epoch 0 in metrics.jsonl; no usable checkpoint)"),
    "resume from a missing file": (["--resume", "/nonexistent/ckpt.pt"], "--resume: /nonexistent/ckpt.pt does not exist"),
    "elastic without an elastic launch": (["--elastic"], "run.elastic needs an elastic launch: launch/run-elastic.sh"),
    "commit every 0": (["--commit-every", "0"], "run.commit_every must be >= 1, got 0"),
    "empty run dir": (["--run-dir", ""], "run.run_dir is empty; give a directory"),
}
FILE_CASES = {
    "broken.yaml": "invalid YAML in",
    "typo.yaml": "unknown config key 'schedule.intial_batch' (did you mean 'initial_batch'?)",
    "section.yaml": "unknown config section 'schedul' (did you mean 'schedule'?)",
    "list.yaml": "the config must be a mapping of sections",
    "badtype.yaml": "schedule.epochs: expected int, got 'many'",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flags(case, tmp_path):
    args, message = CASES[case]
    existing = ROOT / "runs/.test-existing/metrics.jsonl"
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_text('{"epoch": 0}\n')
    run = [] if "--run-dir" in args else ["--run-dir", tmp_path / "run"]
    assert_one_line_error(train("--config", "configs/fashion_mnist.yaml", *run, *args), message)
    assert existing.read_text() == '{"epoch": 0}\n'  # an earlier run's files are never touched


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_bad_config_files(name, files, tmp_path):
    proc = train("--config", files / name, "--run-dir", tmp_path / "run")
    assert_one_line_error(proc, FILE_CASES[name])
    assert not (tmp_path / "run").exists()  # nothing was created for a config that never parsed


def test_plan_errors_for_world_size():
    assert_one_line_error(plan("-c", "configs/fashion_mnist.yaml", "--world-size", "3"),
                          "global batch 128 (epoch 0, stage 0) is not divisible by the world size 3", "adabatch-plan")
    ok = plan("-c", "configs/fashion_mnist.yaml", "--world-size", "2")
    assert ok.returncode == 0 and "  2     4-5     512         256     64      4" in ok.stdout, ok.stdout
    elastic = plan("-c", "configs/fashion_mnist.yaml", "--world-size", "3", "--elastic")  # uneven shares
    assert elastic.returncode == 0 and "  0     0-1     128          43     43      1" in elastic.stdout, elastic.stdout


def test_indivisible_batch_under_horovodrun_exits_2_on_every_rank(tmp_path):
    proc = horovodrun([sys.executable, "-m", "adabatch_hvd", "--config", "configs/fashion_mnist.yaml",
                       "--run-dir", tmp_path / "run", "--initial-batch", "125"], check=False, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # Every rank finds the error and exits 2; horovodrun ends the job at the first exit, so the other
    # rank may be killed before it prints (seen under load): one or two lines, never another kind.
    line = "adabatch-train: error: global batch 125 (epoch 0, stage 0) is not divisible by the world size 2"
    assert 1 <= out.count(line) <= 2, out[-3000:]
    assert re.search(r"Process [01] exit with status code 2", out), out[-3000:]
    assert "<stderr>:Traceback" not in out  # no rank printed one (horovodrun itself reports the failure)


def test_checkpoint_from_another_model_keeps_everything(tmp_path):
    run = tmp_path / "run"
    first = train(*TINY, "--run-dir", run)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert any(p.suffix == ".pt" for p in saved) and (run / "metrics.jsonl") in saved
    other = train(*TINY, "--run-dir", run, "--model.name", "fmnist_cnn", "--synthetic-shape", "1,16,16",
                  "--resume")
    assert_one_line_error(other, "is for model 'mlp' with 10 classes, not 'fmnist_cnn'")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved  # nothing lost or changed
    assert len(json.loads((run / "metrics.jsonl").read_text().splitlines()[0])) > 5


def test_plan_of_a_noise_run_says_what_is_decided_at_run_time():
    """Issue 20: adabatch-plan --mode noise lists the stages it can reach and states the rule and its bounds."""
    proc = plan("-c", "configs/fashion_mnist.yaml", "--world-size", "2", "--mode", "noise", "--epochs", "5",
                "--max-batch", "512", "--schedule.noise_multiple", "0.5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "mode=noise" in lines[0]
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[1] for r in rows] == ["run", "run", "run"] and [r[3] for r in rows] == ["128", "256", "512"], lines
    assert lines[-1] == ("decided at run time: when each stage starts (at an epoch's end, once the smoothed gradient "
                         "noise scale has been >= 0.5 x the next global batch for 4 checks in a row, 4 per epoch, "
                         "after 50000 samples; measured on 1 step in 8); bounds: stage 0 from epoch 0, at most "
                         "one growth per epoch, 2 growth(s) at most (max_batch=512), never shrinking; the lr column "
                         "is a stage's first LR if it starts at the earliest epoch: it decays x0.375 every 2 epoch(s) "
                         "whether the batch grew or not")


def test_one_data_set_registry_for_the_plan_the_help_and_the_readers():
    """config.DATA_SETS is the one list: adabatch-plan reads its sizes without importing torch, the help
    lists its names, and data.py reads each set with the reader the registry names."""
    from adabatch_hvd import config, data

    names = list(config.DATA_SETS)
    assert data.DATASETS == tuple(names)
    assert all(callable(getattr(data, d.reader)) for d in config.DATA_SETS.values() if d.reader)
    code = ("import sys; from adabatch_hvd.cli import plan_main\n"
            f"for name in {names!r}:\n"
            "    assert plan_main(['--data.name', name, '--initial-batch', '100', '--epochs', '1']) == 0\n"
            "assert 'torch' not in sys.modules, 'adabatch-plan imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=hvd_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = re.findall(r"on (\S+) \((\d+) samples\)", proc.stdout)
    assert sizes == [(n, str(d.train_size or config.DataConfig().synthetic_samples))
                     for n, d in config.DATA_SETS.items()], proc.stdout
    help_text = subprocess.run([sys.executable, "-m", "adabatch_hvd", "--help"], cwd=ROOT, env=hvd_env(),
                               capture_output=True, text=True, timeout=120).stdout
    assert "data set: fashion-mnist, cifar10, cifar100, imagenet or synthetic" in " ".join(help_text.split())
