"""launch/setup.sh: every checkout runs its own code over the one shared environment (issue 12, item 13)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _py(checkout: Path, code: str) -> str:
    # cwd "/": `python -c` puts the working directory first on sys.path, which would hide what .venv resolves.
    out = subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         timeout=120, cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_second_clone_runs_its_own_code(tmp_path):
    clone = tmp_path / "clone with space"
    # A copy of this working tree as git sees it (tracked and untracked files, not the ignored .venv).
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    marker = f"CLONEMARK{os.getpid()}"  # no hyphen: argparse may wrap the help text there
    init = clone / "adabatch_hvd" / "__init__.py"
    init.write_text(init.read_text() + f"\nCLONE_MARKER = {marker!r}\n")
    cli = clone / "adabatch_hvd" / "cli.py"
    cli.write_text(cli.read_text().replace("without training.", f"without training. {marker}"))
    # The Debian packages are already there (this suite's own set-up installed them).
    env = dict(os.environ, ADABATCH_SKIP_APT="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(clone / "launch" / "setup.sh")], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reusing environment" in proc.stdout, "a second checkout must reuse the shared environment"

    venv = clone / ".venv"
    assert venv.is_dir() and not venv.is_symlink(), ".venv must be the checkout's own thin venv, not a link"
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    assert size < 20 * 2**20, f"the thin .venv holds {size} bytes; the packages belong in the shared environment"

    assert _py(clone, "import adabatch_hvd; print(adabatch_hvd.__file__)") == str(clone / "adabatch_hvd" / "__init__.py")
    assert _py(clone, "import adabatch_hvd; print(adabatch_hvd.CLONE_MARKER)") == marker
    # Console scripts of the clone run the clone's code (its own and the re-pointed shared ones).
    plan = subprocess.run([str(venv / "bin" / "adabatch-plan"), "--help"], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert plan.returncode == 0 and marker in plan.stdout, plan.stdout[-500:] + plan.stderr[-500:]
    probe = tmp_path / "probe" / "test_probe.py"
    probe.parent.mkdir()
    probe.write_text(f"import adabatch_hvd, horovod.torch\n\ndef test_probe():\n"
                     f"    assert adabatch_hvd.CLONE_MARKER == {marker!r}\n")
    run = subprocess.run([str(venv / "bin" / "pytest"), "-q", "-p", "no:cacheprovider", str(probe)],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, run.stdout[-1500:]
    check = subprocess.run([str(venv / "bin" / "horovodrun"), "--check-build"], capture_output=True, text=True,
                           timeout=120, cwd="/")
    assert check.returncode == 0 and "[X] PyTorch" in check.stdout, check.stdout + check.stderr
    # ... and this checkout still runs its own code, not the clone's.
    here = _py(ROOT, "import adabatch_hvd; print(adabatch_hvd.__file__)")
    assert here == str(ROOT / "adabatch_hvd" / "__init__.py"), here
    assert sys.prefix != str(venv)
