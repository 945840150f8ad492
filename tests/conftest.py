"""Shared helpers: run a worker script under horovodrun with 2 ranks (Gloo or MPI)."""

import ast
import functools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
BIN = Path(sys.executable).parent


# The run the launcher tests train (test_signals, test_multinode, test_slurm): 2048 Fashion-MNIST samples,
# an MLP, 2 stages (global batch 32, then 64 as 2 micro-batches of 16 per worker), a checkpoint every 8
# steps and 1 thread a rank: 96 optimizer steps, a few seconds on 2 cores.
SMALL = ["--config", "configs/fashion_mnist.yaml", "--train-samples", "2048", "--test-samples", "256",
         "--epochs", "2", "--interval", "1", "--initial-batch", "32", "--max-micro-batch", "16",
         "--model.name", "mlp", "--every-steps", "8", "--quiet", "true", "--threads", "1"]
SMALL_STEPS = 64 + 32
TIMING = ("epoch_seconds", "samples_per_second", "allreduce_wait_share")


def hvd_env(**extra):
    env = dict(os.environ)
    # OpenMPI refuses root unless told; CI runs as root.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def horovodrun_cmd(args, controller="gloo", np=2):
    """`horovodrun -np N -H localhost:N --gloo|--mpi ARGS...` as a list of strings."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}"]
    if controller == "mpi":
        cmd += ["--mpi-args=--oversubscribe"]
    return cmd + [str(a) for a in args]


def horovodrun(args, controller="gloo", np=2, timeout=300, env=None, check=True):
    """Run `horovodrun -np N -H localhost:N --gloo|--mpi ARGS...` and return the CompletedProcess."""
    cmd = horovodrun_cmd(args, controller, np)
    proc = subprocess.run(cmd, cwd=ROOT, env=env or hvd_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def processes_with(text):
    """PIDs whose command line mentions `text` (the run dir), with their HOROVOD_RANK."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if text in cmd:
            rank = next((e.split(b"=")[1].decode() for e in env if e.startswith(b"HOROVOD_RANK=")), None)
            found[int(pid)] = rank
    return found


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_worker(name, out_dir, *args, controller="gloo", np=2, timeout=300):
    """Run tests/workers/NAME.py under horovodrun; each rank writes OUT/rank{r}.json."""
    horovodrun([sys.executable, WORKERS / f"{name}.py", out_dir, *args], controller=controller, np=np,
               timeout=timeout)
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(np)]


@pytest.fixture(params=["gloo", "mpi"])
def controller(request):
    return request.param


@pytest.fixture(scope="module")
def make_cluster():
    """make_cluster(n_hosts=2, bandwidth=None, second_net=False, slurm=False) -> a running
    tests/cluster.py Cluster, torn down after the module (or by its watcher if pytest is killed).
    Where it cannot be made (not root, no network namespaces), the test fails with one line."""
    from cluster import Cluster, ClusterError

    made = []

    def make(**kw):
        try:
            made.append(Cluster(**kw).up())
        except ClusterError as e:
            pytest.fail(f"test cluster: {e}", pytrace=False)
        return made[-1]

    yield make
    for c in made:
        c.down()


def records(run_dir):
    """metrics.jsonl of a run, one dict per epoch."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    from adabatch_hvd import checkpoint

    state, _ = checkpoint.load("latest", Path(run_dir) / "checkpoints")
    return state["model"]


def weight_difference(a, b) -> float:
    """The largest absolute difference between two state dicts' tensors (0.0: bit-identical)."""
    assert a.keys() == b.keys()
    return max((x.double() - y.double()).abs().max().item() for x, y in ((a[k], b[k]) for k in a))


def assert_same_records(got, want):
    """The same epochs, batches and learning rates, and losses and accuracies to 1e-6 (timings aside)."""
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        for key in w:
            if key in TIMING:
                continue
            if isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], abs=1e-6), (key, g, w)
            else:
                assert g[key] == w[key], (key, g, w)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """SMALL trained straight through by 2 processes on one host (launch/run-local.sh, Gloo): the run that
    every launcher test (other hosts, other launchers, interrupted and resumed) must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run([ROOT / "launch/run-local.sh", "2", "--threads", "1", "--", *SMALL, "--run-dir", run],
                          cwd=ROOT, env=hvd_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert records(run)[-1]["global_step"] == SMALL_STEPS
    return run


# ---- markers -----------------------------------------------------------------------------------------------
# What a test needs beyond this interpreter and a few seconds, set here rather than in each file (the markers
# are described in pytest.ini). `make test-fast` (pytest -m "not slow") runs the rest, the pure tests, in a few
# minutes; `make test` runs everything. A table entry is a module and either ALL of its tests or the names of
# some (without parameters). A test that uses a fixture of BY_FIXTURE, or calls a helper of BY_CALL (itself, or
# through a function or fixture of its file), gets those markers too, so that a new test is not fast by
# mistake; IMPLIES adds the markers that a marker entails.
ALL = None
MARKS = {
    # root: tests/cluster.py's hosts (network namespaces, a bridge, sshd), several hosts on this machine
    "cluster": {"test_bench": ALL, "test_cluster": ALL, "test_elastic": ALL, "test_multinode": ALL,
                "test_slurm": ALL},
    # slurmctld and slurmd on the test cluster's hosts
    "slurm": {"test_slurm": ALL},
    # real Horovod jobs of several ranks on this host: horovodrun, mpirun or launch/run-local.sh
    "horovodrun": {
        "test_cli": ["test_indivisible_batch_under_horovodrun_exits_2_on_every_rank"],
        "test_comm": ["test_fp16_halves_the_bytes_and_keeps_the_update_within_tolerance",
                      "test_autotune_setting_reaches_horovods_core",
                      "test_step_scalars_ride_in_the_gradients_fusion_buffer"],
        "test_horovod": ["test_dist_ops_on_two_ranks", "test_engine_parity_across_k_changes",
                         "test_engine_parity_negative_control"],
        "test_microbatch": ["test_out_of_memory_on_one_rank_halves_and_keeps_exact_parity",
                            "test_auto_picks_the_fastest_candidate_and_a_resume_keeps_it"],
        "test_nocuda": ["test_wheel_allreduces_on_two_ranks_without_cuda"],
        "test_noise": ["test_real_horovod_steps_give_the_exact_inputs"],
        "test_packaging": ["test_run_local_really_launches_ranks"],
        "test_precision": ["test_an_inf_on_one_rank_skips_that_step_on_every_rank_in_lockstep",
                           "test_bf16_with_fp16_compression_is_correct",
                           "test_the_scaler_state_is_synced_checkpointed_and_committed",
                           "test_fp16_stop_and_resume_mid_stage_is_bit_identical"],
        "test_resume_compat": ALL,
        "test_resume": ["test_sigkill_mid_epoch_in_stage_two_then_resume_is_exact",
                        "test_resume_on_another_world_size_keeps_the_global_batch",
                        "test_tensorboard_events_have_every_tag", "test_report_png_for_two_runs",
                        "test_killed_worker_ends_the_job_without_hanging"],
        "test_signals": ["test_signal_stops_the_whole_job_then_resume_is_exact",
                         "test_ctrl_c_to_a_process_group_with_timeout_in_it_is_a_clean_stop"],
        "test_training": ALL,
    },
    # compiles Horovod (launch/build-horovod.sh; minutes unless its wheel cache holds the build) or runs
    # launch/setup.sh
    "build": {"test_nccl_build": ALL, "test_setup": ALL,
              "test_nocuda": ["test_build_is_the_cpu_flavour_and_compiles",
                              "test_wheel_has_pytorch_gloo_and_mpi_and_no_cuda",
                              "test_wheel_allreduces_on_two_ranks_without_cuda"]},
    # root: mounts (a small tmpfs), unshare, setpriv, or the test cluster
    "root": {"test_lifecycle": ALL, "test_nocuda": ["test_build_is_the_cpu_flavour_and_compiles",
                                                    "test_wheel_has_pytorch_gloo_and_mpi_and_no_cuda",
                                                    "test_wheel_allreduces_on_two_ranks_without_cuda"],
             "test_rundir": ["test_a_full_disk_is_one_line_and_exit_4_with_the_last_checkpoint_kept"]},
    # one process, but it trains: adabatch-train run (and resumed) in a subprocess, 5 to 50 s of CPU each on 2
    # cores; horovodrun --check-build, 13 s
    "slow": {
        "test_checkpoint": ["test_garbage_with_the_highest_step_then_resume_keep_1_loses_nothing",
                            "test_resume_from_an_explicit_older_checkpoint_then_plain_resume_continues_it",
                            "test_resume_after_a_crash_mid_line_in_metrics"],
        "test_cli": ["test_checkpoint_from_another_model_keeps_everything"],
        "test_horovod": ["test_check_build_lists_pytorch_gloo_and_mpi"],
        "test_input_path": ["test_channels_last_trains_as_the_default_layout_does"],  # two trainers, 6 s
        "test_lifecycle": ALL,
        "test_precision": ["test_bf16_and_fp16_train_within_a_band_of_fp32",  # these three: band_runs
                           "test_checkpoints_hold_the_scaler_only_under_fp16",
                           "test_a_checkpoint_without_scaler_state_resumes_under_fp16"],
        "test_resume": ["test_nan_loss_stops_and_keeps_the_last_good_checkpoint",
                        "test_an_epoch_record_published_again_adds_no_tensorboard_point"],
        "test_rundir": ["test_incoherent_resumes_are_one_line_and_change_nothing",  # these six: finished
                        "test_resume_of_a_finished_run_with_no_more_epochs_is_a_no_op",
                        "test_safe_changes_are_logged_and_kept_in_the_history",
                        "test_no_start_mode_starts_over_a_run_without_a_checkpoint",
                        "test_corrupt_checkpoints_are_refused_by_every_mode_and_every_time",
                        "test_a_cut_record_is_restored_from_the_checkpoint",
                        "test_a_run_that_fails_during_set_up_leaves_no_run_dir",
                        "test_a_run_that_fails_at_its_first_step_leaves_no_run_dir",
                        "test_yaml_stages_with_colons_and_resume_true",
                        "test_device_gpu_means_cuda_end_to_end",
                        "test_tensorboard_per_step_on_samples_seen_survives_a_resume",
                        "test_resume_auto_starts_a_new_run_dir_and_one_that_saved_nothing",
                        "test_a_file_in_the_run_dirs_way_is_found_before_the_first_step",
                        "test_a_stop_signal_as_soon_as_the_process_starts_stops_at_the_first_step",
                        "test_a_second_job_on_a_run_dir_is_refused_and_a_killed_ones_lock_is_taken_over",
                        "test_a_full_disk_is_one_line_and_exit_4_with_the_last_checkpoint_kept"],
    },
}
BY_FIXTURE = {"make_cluster": ["cluster"], "reference_run": ["horovodrun"]}
BY_CALL = {"horovodrun": ["horovodrun"], "run_worker": ["horovodrun"]}
IMPLIES = {"slurm": ["cluster"], "cluster": ["root", "slow"], "horovodrun": ["slow"], "build": ["slow"]}


@functools.lru_cache(maxsize=None)
def _calls(path):
    """For each top-level function of a test file (tests and fixtures): the names it calls, itself or
    through the file's other functions."""
    direct = {}
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            direct[node.name] = {c.func.id for c in ast.walk(node)
                                 if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    closed = {}
    for name in direct:
        seen, todo = set(), [name]
        while todo:
            for callee in direct.get(todo.pop(), ()):
                if callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
        closed[name] = seen
    return closed


def _marks_of(item):
    module, name = item.path.stem, getattr(item, "originalname", item.name)
    names = {m for m, table in MARKS.items() if module in table and (table[module] is ALL or name in table[module])}
    names |= {m for fixture, marks in BY_FIXTURE.items() if fixture in item.fixturenames for m in marks}
    calls = _calls(str(item.path))
    reached = set().union(*(calls.get(f, set()) for f in [name, *item.fixturenames]))
    names |= {m for helper, marks in BY_CALL.items() if helper in reached for m in marks}
    todo = list(names)
    while todo:
        for m in IMPLIES.get(todo.pop(), []):
            if m not in names:
                names.add(m)
                todo.append(m)
    return names


def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        for name in sorted(_marks_of(item)):
            item.add_marker(name)
        if getattr(item, "module", None):
            modules.setdefault(item.path.stem, item.module)
    # A test renamed or removed leaves a name here that marks nothing: say so rather than let it run as fast.
    for mark, table in MARKS.items():
        for module, names in table.items():
            for name in names or []:
                if module in modules and not hasattr(modules[module], name):
                    warnings.warn(pytest.PytestConfigWarning(
                        f"tests/conftest.py MARKS[{mark!r}] names {module}.{name}, which is not there"))
