"""tpu_scripts/: the exact gcloud commands of every subcommand's --dry-run (no network, no
gcloud: a fake `gcloud` first on PATH records any call, and a dry run must make none), the
errors for missing parameters, the bash wrappers, and the launch/stop commands run for real
by a local bash with a fake python."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
TPU_PY = SCRIPTS / "tpu.py"
# Every variable the scripts read: cleared so the caller's environment cannot leak in.
VARIABLES = ("TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT PREEMPTIBLE QUEUED "
             "QUEUED_RESOURCE_ID NETWORK SUBNETWORK SERVICE_ACCOUNT SCOPES CREATE_ARGS "
             "INTERNAL_IP REPO_URL BRANCH REMOTE_DIR JAX_TPU_SPEC DATA_SRC DATA_DST DATA_MODE "
             "CONFIG EXTRA_ARGS REMOTE_ENV REMOTE_PYTHON LOG_DIR LOG_WORKER LOG_LINES LOG_FOLLOW "
             "DRY_RUN PYTHON").split()
BASE = {"TPU_NAME": "phimr", "ZONE": "us-central2-b", "PROJECT": "my-proj"}
TPU = "gcloud compute tpus"
WHERE = "--zone=us-central2-b --project=my-proj"
LAUNCH = ("set -e; cd ~/phimr_jax; mkdir -p ~/phimr_jax_logs; nohup python3 -m phimr_jax.main "
          "--config=configs/rl.py:phi4_mini --distributed{extra} "
          ">> ~/phimr_jax_logs/$(hostname).log 2>&1 < /dev/null & "
          "echo $! > ~/phimr_jax_logs/$(hostname).pid; echo started $(hostname) pid $!")


@pytest.fixture
def fake_bin(tmp_path):
    """A directory with a `gcloud` that appends its argv (shell-quoted, one line per call)
    to $FAKE_GCLOUD_CALLS and exits with $FAKE_GCLOUD_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text('#!/bin/bash\nprintf "%q " gcloud "$@" >> "$FAKE_GCLOUD_CALLS"\n'
                      'echo >> "$FAKE_GCLOUD_CALLS"\nexit "${FAKE_GCLOUD_RC:-0}"\n')
    gcloud.chmod(0o755)
    return bin_dir


@pytest.fixture
def run(tmp_path, fake_bin):
    """run(*args, env={...}, dry=True) -> CompletedProcess; asserts a dry run called nothing."""
    calls = tmp_path / "calls.txt"

    def _run(*args, env=None, dry=True, cmd=None, path=None):
        full = {k: v for k, v in os.environ.items() if k not in VARIABLES}
        full.update(BASE)
        full.update(env or {})
        full = {k: v for k, v in full.items() if v is not None}
        full["PATH"] = path if path is not None else f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
        full["FAKE_GCLOUD_CALLS"] = str(calls)
        full["TMPDIR"] = str(tmp_path)
        full["PYTHON"] = sys.executable
        argv = (cmd or [sys.executable, str(TPU_PY)]) + list(args) + (["--dry-run"] if dry else [])
        if "--" in args and dry:  # keep `--dry-run` before the arguments for phimr_jax.main
            cut = argv.index("--")
            argv = argv[:cut] + ["--dry-run"] + argv[cut:-1]
        res = subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60)
        if dry:
            assert not calls.exists(), f"a dry run called gcloud: {calls.read_text()}"
        res.calls = calls.read_text().splitlines() if calls.exists() else []
        return res

    return _run


def lines(res) -> list[str]:
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def ssh(command: str, worker: str = "all") -> str:
    """The printed form of `gcloud ... tpu-vm ssh phimr ... --command=COMMAND`."""
    return shlex.join(shlex.split(f"{TPU} tpu-vm ssh phimr {WHERE} --worker={worker}")
                      + [f"--command={command}"])


def remote(line: str) -> str:
    """The --command= of a printed ssh line (the shell command the workers run)."""
    words = shlex.split(line)
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], line
    return next(w for w in words if w.startswith("--command="))[len("--command="):]


# ----------------------------------------------------------------------------- create
def test_create(run):
    out = lines(run("create", env={"ACCELERATOR_TYPE": "v4-32"}))
    assert out == [f"{TPU} tpu-vm create phimr {WHERE} --accelerator-type=v4-32 "
                   "--version=tpu-ubuntu2204-base"]


def test_create_flags_win_over_env_and_options(run):
    out = lines(run("create", "--tpu-name=other", "--zone=europe-west4-a",
                    "--accelerator-type=v5litepod-16", "--runtime-version=my-runtime", "--spot",
                    "--network=net", "--scopes=cloud-platform", "--create-args=--labels=a=b",
                    env={"ACCELERATOR_TYPE": "v4-8", "PROJECT": None}))
    assert out == [f"{TPU} tpu-vm create other --zone=europe-west4-a "
                   "--accelerator-type=v5litepod-16 --version=my-runtime --spot --network=net "
                   "--scopes=cloud-platform --labels=a=b"]


@pytest.mark.parametrize("accel,version", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v4-8", "tpu-ubuntu2204-base")])
def test_create_default_runtime_per_generation(run, accel, version):
    out = lines(run("create", env={"ACCELERATOR_TYPE": accel, "PREEMPTIBLE": "1"}))
    assert out == [f"{TPU} tpu-vm create phimr {WHERE} --accelerator-type={accel} "
                   f"--version={version} --preemptible"]


def test_create_queued_spot_waits_for_active(run):
    out = lines(run("create", env={"ACCELERATOR_TYPE": "v4-32", "QUEUED": "1", "SPOT": "true"}))
    assert out == [
        f"{TPU} queued-resources create phimr-qr --node-id=phimr {WHERE} "
        "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot",
        f"{TPU} queued-resources describe phimr-qr {WHERE} '--format=value(state.state)'"]


# ----------------------------------------------------------------------------- install
def test_install_from_git(run):
    out = lines(run("install", "--branch=dev",
                    env={"REPO_URL": "https://github.com/me/phimr_jax.git"}))
    get = ("if [ -d ~/phimr_jax/.git ]; then git -C ~/phimr_jax fetch origin dev && "
           "git -C ~/phimr_jax checkout --force FETCH_HEAD; else git clone --branch dev "
           "https://github.com/me/phimr_jax.git ~/phimr_jax; fi")
    assert out == [ssh(f'set -e; {get}; cd ~/phimr_jax && python3 -m pip install -e . "jax[tpu]"')]


def test_install_uploads_this_checkout(run, tmp_path):
    out = lines(run("install", env={"JAX_TPU_SPEC": "jax[tpu]==0.6.2"}))
    archive = tmp_path / "phimr_jax-src.tar.gz"
    assert out == [
        f"git -C {ROOT} archive --format=tar.gz --output={archive} HEAD",
        f"{TPU} tpu-vm scp {archive} phimr:phimr_jax-src.tar.gz {WHERE} --worker=all",
        ssh("set -e; mkdir -p ~/phimr_jax && tar -xzf phimr_jax-src.tar.gz -C ~/phimr_jax && "
            "rm -f phimr_jax-src.tar.gz; "
            'cd ~/phimr_jax && python3 -m pip install -e . "jax[tpu]==0.6.2"')]


# ----------------------------------------------------------------------------- copy-data
def test_copy_data_from_gcs(run):
    out = lines(run("copy-data", env={"DATA_SRC": "gs://bkt/data/math"}))
    assert out == [ssh("mkdir -p ~/data && gcloud storage cp -r gs://bkt/data/math ~/data")]


def test_copy_data_local_dir_to_absolute_path(run):
    out = lines(run("copy-data", f"--data-src={ROOT / 'configs'}", "--data-dst=/mnt/data"))
    assert out == [
        ssh("(mkdir -p /mnt/data 2>/dev/null || (sudo mkdir -p /mnt/data && "
            "sudo chown $(id -u):$(id -g) /mnt/data))"),
        f"{TPU} tpu-vm scp {ROOT / 'configs'} phimr:/mnt/data/ {WHERE} --worker=all --recurse"]


def test_copy_data_gcsfuse_mount(run):
    out = lines(run("copy-data", "--data-mode=mount", "--data-src=gs://bkt/runs/",
                    "--data-dst=~/mnt"))
    assert len(out) == 1
    cmd = remote(out[0])
    assert "sudo apt-get install -y -q gcsfuse" in cmd
    assert cmd.endswith("mkdir -p ~/mnt; mountpoint -q ~/mnt || "
                        "gcsfuse --implicit-dirs --only-dir runs bkt ~/mnt")


# ----------------------------------------------------------------------------- launch
def test_launch_default_config_on_every_worker(run):
    out = lines(run("launch"))
    assert out == [ssh(LAUNCH.format(extra=""))]
    assert "python3 -m phimr_jax.main --config=configs/rl.py:phi4_mini --distributed" \
        in remote(out[0])


def test_launch_config_and_extra_args(run):
    out = lines(run("launch", "--config=configs/rl.py", "--", "--config.workdir=/mnt/r",
                    "--config.note=a b",
                    env={"EXTRA_ARGS": "--config.total_steps=10", "REMOTE_ENV": "A=1 B='x y'"}))
    cmd = remote(out[0])
    assert (' nohup env A=1 "B=x y" python3 -m phimr_jax.main --config=configs/rl.py '
            '--distributed --config.total_steps=10 --config.workdir=/mnt/r "--config.note=a b" '
            '>> ~/phimr_jax_logs/$(hostname).log') in cmd
    assert out[0].startswith(f"{TPU} tpu-vm ssh phimr {WHERE} --worker=all ")


def test_logs_stop_teardown(run):
    assert lines(run("logs")) == [ssh("tail -n 100 -F ~/phimr_jax_logs/*.log", worker="0")]
    assert lines(run("logs", "--worker=all", "--no-follow", env={"LOG_LINES": "5"})) == [
        ssh("tail -n 5 ~/phimr_jax_logs/*.log")]
    pid = "~/phimr_jax_logs/$(hostname).pid"
    assert lines(run("stop")) == [ssh(f"if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null "
                                      f"&& echo stopped $(hostname) || true; rm -f {pid}; fi")]
    assert lines(run("teardown")) == [f"{TPU} tpu-vm delete phimr {WHERE} --quiet"]
    assert lines(run("teardown", "--queued")) == [
        f"{TPU} queued-resources delete phimr-qr {WHERE} --force --quiet"]


def test_all_chains_the_steps(run):
    env = {"ACCELERATOR_TYPE": "v4-32", "REPO_URL": "u", "DATA_SRC": "gs://b/d"}
    every = lines(run("all", env=env))
    parts = [lines(run(step, env=env)) for step in ("create", "install", "copy-data", "launch")]
    assert every == sum(parts, [])
    assert len(lines(run("all", env={**env, "DATA_SRC": None}))) == len(every) - 1


def test_remote_commands_parse_as_shell(run):
    env = {"ACCELERATOR_TYPE": "v4-8", "DATA_SRC": "gs://b/d", "EXTRA_ARGS": "--x='a b'"}
    for step in ("install", "copy-data", "launch", "logs", "stop"):
        for line in lines(run(step, env=env)):
            if " tpu-vm ssh " in line:
                check = subprocess.run(["bash", "-n", "-c", remote(line)], capture_output=True)
                assert check.returncode == 0, (line, check.stderr)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("step,unset,message", [
    ("create", "ACCELERATOR_TYPE", "create needs --accelerator-type (or $ACCELERATOR_TYPE)"),
    ("launch", "TPU_NAME", "launch needs --tpu-name (or $TPU_NAME)"),
    ("teardown", "ZONE", "teardown needs --zone (or $ZONE)"),
    ("copy-data", "DATA_SRC", "copy-data needs --data-src (or $DATA_SRC)"),
    ("all", "ACCELERATOR_TYPE", "all needs --accelerator-type (or $ACCELERATOR_TYPE)"),
])
def test_missing_parameter_is_a_clear_error(run, step, unset, message):
    res = run(step, env={unset: None})
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip() == f"error: {message}"


@pytest.mark.parametrize("args,env,message", [
    (["create", "--spot", "--preemptible"], {"ACCELERATOR_TYPE": "v4-8"}, "one of --spot"),
    (["create"], {"ACCELERATOR_TYPE": "v9-8"}, "no default runtime version"),
    (["copy-data", "--data-mode=mount", "--data-src=/local"], {}, "needs a gs:// DATA_SRC"),
    (["copy-data", "--data-mode=rsync", "--data-src=/local"], {}, "copy or mount"),
    (["teardown"], {"QUEUED": "maybe"}, "not a boolean"),
    (["logs", "--lines=ten"], {}, "must be a number"),
])
def test_bad_parameters(run, args, env, message):
    res = run(*args, env=env)
    assert res.returncode == 2 and res.stdout == ""
    assert message in res.stderr


# ----------------------------------------------------------------------------- wrappers, real runs
@pytest.mark.parametrize("step", ["create", "install", "copy-data", "launch", "logs", "stop",
                                  "teardown"])
def test_bash_wrappers_match_the_cli(run, step):
    env = {"ACCELERATOR_TYPE": "v4-8", "DATA_SRC": "gs://b/d"}
    wrapper = SCRIPTS / (step.replace("-", "_") + ".sh")
    assert os.access(wrapper, os.X_OK)
    assert lines(run(env=env, cmd=[str(wrapper)])) == lines(run(step, env=env))


def test_real_run_calls_gcloud_with_the_printed_commands(run):
    printed = lines(run("teardown"))
    res = run("teardown", dry=False)
    assert res.returncode == 0, res.stderr
    assert [shlex.split(c) for c in res.calls] == [shlex.split(p) for p in printed]
    assert f"+ {printed[0]}" in res.stderr


def test_real_run_stops_at_a_failing_command(run):
    res = run("install", "--repo-url=u", dry=False, env={"FAKE_GCLOUD_RC": "3"})
    assert res.returncode == 3
    assert "error: exit status 3 from: gcloud compute tpus tpu-vm ssh" in res.stderr


def test_real_run_without_gcloud_is_a_clear_error(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run("teardown", dry=False, path=str(empty))
    assert res.returncode == 2 and res.calls == []
    assert "gcloud not found on PATH" in res.stderr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_launch_and_stop_commands_run_in_bash(run, tmp_path):
    """The workers' launch command, run here: a background process, its log and pid file;
    then the stop command kills it."""
    repo, logs = tmp_path / "repo", tmp_path / "logs"
    repo.mkdir()
    python = tmp_path / "fake-python"
    python.write_text('#!/bin/bash\necho "ARGS $* FOO=$FOO"\nexec sleep 60\n')
    python.chmod(0o755)
    flags = [f"--remote-dir={repo}", f"--log-dir={logs}", f"--python={python}", "--env=FOO=bar"]
    start = remote(lines(run("launch", *flags, "--", "--config.x=1"))[0])
    res = subprocess.run(["bash", "-c", start], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "started" in res.stdout, res.stderr
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    pid = int((logs / f"{host}.pid").read_text())
    try:
        log = logs / f"{host}.log"
        for _ in range(100):
            if log.exists() and "ARGS" in log.read_text():
                break
            time.sleep(0.05)
        assert ("ARGS -m phimr_jax.main --config=configs/rl.py:phi4_mini --distributed "
                "--config.x=1 FOO=bar") in log.read_text()
        assert _alive(pid)
        stop = remote(lines(run("stop", *flags))[0])
        res = subprocess.run(["bash", "-c", stop], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and "stopped" in res.stdout, res.stderr
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        assert not _alive(pid)
        assert not (logs / f"{host}.pid").exists()
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
