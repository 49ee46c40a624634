#!/usr/bin/env python3
"""Create, provision, run and delete a Cloud TPU VM or pod slice for phimr_jax (stdlib only).

    python tpu_scripts/tpu.py SUBCOMMAND [options] [-- extra args for phimr_jax.main]

Subcommands (each one prints its commands instead of running them under --dry-run):
  create      gcloud compute tpus tpu-vm create (or queued-resources create with --queued)
  install     put the repo on every worker (git clone REPO_URL, or upload this checkout) and
              pip install -e . 'jax[tpu]'
  copy-data   DATA_SRC (gs://... or a local path) -> DATA_DST on every worker; or gcsfuse-mount
              a bucket there with --data-mode=mount
  launch      nohup python3 -m phimr_jax.main --config=CONFIG --distributed ... on every worker,
              one log file per worker (LOG_DIR/<hostname>.log)
  logs        tail the log of one worker (--worker, default 0) or all of them
  stop        kill the run started by `launch` on every worker (by its pid file)
  teardown    delete the TPU VM (and its queued resource with --queued), --quiet
  all         create, install, copy-data (when DATA_SRC is set), launch

Every option can also come from the environment variable named in its help (flags win).
See tpu_scripts/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD_TPU = ["gcloud", "compute", "tpus"]
# Runtime (software) version per TPU generation, from cloud.google.com/tpu/docs/runtimes.
RUNTIME_BY_FAMILY = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
SUBCOMMANDS = ("create", "install", "copy-data", "launch", "logs", "stop", "teardown", "all")
# Polling of a queued resource until its node exists (real runs only).
POLL_SECONDS = 30


class UsageError(Exception):
    """A missing or inconsistent parameter: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- parameters
def _env_bool(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"${name}={os.environ[name]!r} is not a boolean (use 1/0, true/false)")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    common = argparse.ArgumentParser(add_help=False)

    def opt(flag, var, default=None, help_=""):
        shown = f", default {default!r}]" if default else "]"
        common.add_argument(flag, default=env(var, default), help=f"{help_} [${var}{shown}")

    def switch(flag, var, help_, default=False):
        value = _env_bool(var) if os.environ.get(var, "").strip() else default
        common.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                            help=f"{help_} [${var}=1/0]")

    opt("--tpu-name", "TPU_NAME", help_="TPU VM / node name (required)")
    opt("--zone", "ZONE", help_="zone, e.g. us-central2-b (required)")
    opt("--project", "PROJECT", help_="GCP project (default: gcloud's configured project)")
    opt("--accelerator-type", "ACCELERATOR_TYPE", help_="e.g. v4-8, v4-32, v5litepod-16, v5p-8 "
        "(required by create)")
    opt("--runtime-version", "RUNTIME_VERSION",
        help_="TPU software version (default: from the accelerator generation)")
    switch("--spot", "SPOT", "create a Spot TPU (preemptible, no time limit)")
    switch("--preemptible", "PREEMPTIBLE", "create a preemptible TPU (not with --queued)")
    switch("--queued", "QUEUED", "create through a queued resource (waits for capacity)")
    opt("--queued-resource-id", "QUEUED_RESOURCE_ID", help_="queued resource name "
        "(default: TPU_NAME-qr)")
    opt("--network", "NETWORK", help_="VPC network for create")
    opt("--subnetwork", "SUBNETWORK", help_="subnetwork for create")
    opt("--service-account", "SERVICE_ACCOUNT", help_="service account of the workers")
    opt("--scopes", "SCOPES", help_="access scopes of the workers, e.g. cloud-platform")
    opt("--create-args", "CREATE_ARGS", "", "more flags for the create command (one string)")
    switch("--internal-ip", "INTERNAL_IP", "ssh/scp to the workers' internal IPs")
    opt("--repo-url", "REPO_URL", help_="git URL to clone on the workers (default: upload this "
        "checkout's HEAD with git archive)")
    opt("--branch", "BRANCH", "main", "branch or tag to clone")
    opt("--remote-dir", "REMOTE_DIR", "~/phimr_jax", "repo directory on the workers")
    opt("--jax-tpu", "JAX_TPU_SPEC", "jax[tpu]", "pip requirement that brings JAX's TPU backend")
    opt("--data-src", "DATA_SRC", help_="gs://bucket/path or a local file/directory")
    opt("--data-dst", "DATA_DST", "~/data", "where the data lands on every worker")
    opt("--data-mode", "DATA_MODE", "copy", "copy, or mount (gcsfuse; DATA_SRC must be gs://)")
    opt("--config", "CONFIG", "configs/rl.py:phi4_mini", "config[:preset] for phimr_jax.main")
    opt("--extra-args", "EXTRA_ARGS", "", "more flags for phimr_jax.main (one string; "
        "arguments after `--` are appended too)")
    opt("--env", "REMOTE_ENV", "", "environment for the run, e.g. 'XLA_FLAGS=... FOO=1'")
    opt("--python", "REMOTE_PYTHON", "python3", "python on the workers")
    opt("--log-dir", "LOG_DIR", "~/phimr_jax_logs", "log / pid directory on the workers")
    opt("--worker", "LOG_WORKER", "0", "logs: which worker to tail (an index or all)")
    opt("--lines", "LOG_LINES", "100", "logs: lines of history to show")
    switch("--follow", "LOG_FOLLOW", "logs: keep following (tail -F); --no-follow prints and exits",
           default=True)
    switch("--dry-run", "DRY_RUN", "print the commands, one per line, instead of running them")

    parser = argparse.ArgumentParser(
        prog="tpu.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    for name in SUBCOMMANDS:
        sub.add_parser(name, parents=[common], help=f"see `tpu.py {name} --help`")
    return parser


def _need(args, command: str, *names: str) -> None:
    """Fail with one clear line when a required parameter is missing."""
    for name in names:
        if not getattr(args, name):
            flag, var = "--" + name.replace("_", "-"), name.upper()
            raise UsageError(f"{command} needs {flag} (or ${var})")


# ----------------------------------------------------------------------------- helpers
def q(word: str) -> str:
    """Quote one word for the workers' shell: bare when safe, "..." when that is exact, else
    '...' (keeps the printed commands readable: the whole --command is quoted once more)."""
    if shlex.quote(word) == word:
        return word
    if not any(c in word for c in '$`"\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def q_join(words: list[str]) -> str:
    return " ".join(q(w) for w in words)


def remote_path(path: str) -> str:
    """Quote a path for the workers' shell, keeping a leading ~/ expandable."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + q(path[2:])
    return q(path)


def make_dir(path: str) -> str:
    """mkdir -p on a worker; an absolute one (e.g. /mnt/...) falls back to sudo, then chown."""
    if path.startswith("~"):
        return f"mkdir -p {path}"
    return (f"(mkdir -p {path} 2>/dev/null || "
            f"(sudo mkdir -p {path} && sudo chown $(id -u):$(id -g) {path}))")


def scp_path(path: str) -> str:
    """scp takes remote paths relative to the home directory; drop a leading ~/."""
    return path[2:] if path.startswith("~/") else path


def runtime_version(args) -> str:
    if args.runtime_version:
        return args.runtime_version
    family = args.accelerator_type.split("-")[0]
    if family not in RUNTIME_BY_FAMILY:
        raise UsageError(f"no default runtime version for accelerator type "
                         f"{args.accelerator_type!r}; give --runtime-version (or $RUNTIME_VERSION)")
    return RUNTIME_BY_FAMILY[family]


def queued_id(args) -> str:
    return args.queued_resource_id or f"{args.tpu_name}-qr"


def _where(args) -> list[str]:
    """--zone and, when given, --project (appended to every gcloud command)."""
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def ssh(args, command: str, worker: str = "all") -> list[str]:
    """gcloud ... tpu-vm ssh NAME on `worker` (all: every host of the slice, in parallel)."""
    return (GCLOUD_TPU + ["tpu-vm", "ssh", args.tpu_name] + _where(args) + [f"--worker={worker}"]
            + (["--internal-ip"] if args.internal_ip else []) + [f"--command={command}"])


def scp(args, src: str, dst: str, recurse: bool = False) -> list[str]:
    """gcloud ... tpu-vm scp SRC NAME:DST to every worker."""
    return (GCLOUD_TPU + ["tpu-vm", "scp", src, f"{args.tpu_name}:{scp_path(dst)}"]
            + _where(args) + ["--worker=all"] + (["--recurse"] if recurse else [])
            + (["--internal-ip"] if args.internal_ip else []))


# ----------------------------------------------------------------------------- plans
# A plan is a list of steps (kind, argv): kind "run" runs argv; "wait" polls a queued
# resource's state with argv until it is ACTIVE. --dry-run prints every argv instead.

def plan_create(args) -> list:
    _need(args, "create", "tpu_name", "zone", "accelerator_type")
    version = runtime_version(args)
    optional = ([f"--network={args.network}"] if args.network else []) \
        + ([f"--subnetwork={args.subnetwork}"] if args.subnetwork else []) \
        + ([f"--service-account={args.service_account}"] if args.service_account else []) \
        + ([f"--scopes={args.scopes}"] if args.scopes else []) \
        + shlex.split(args.create_args or "")
    if args.spot and args.preemptible:
        raise UsageError("give one of --spot and --preemptible")
    if args.queued:
        if args.preemptible:
            raise UsageError("queued resources take --spot, not --preemptible")
        qid = queued_id(args)
        create = (GCLOUD_TPU + ["queued-resources", "create", qid, f"--node-id={args.tpu_name}"]
                  + _where(args) + [f"--accelerator-type={args.accelerator_type}",
                                    f"--runtime-version={version}"]
                  + (["--spot"] if args.spot else []) + optional)
        describe = (GCLOUD_TPU + ["queued-resources", "describe", qid] + _where(args)
                    + ["--format=value(state.state)"])
        return [("run", create), ("wait", describe)]
    create = (GCLOUD_TPU + ["tpu-vm", "create", args.tpu_name] + _where(args)
              + [f"--accelerator-type={args.accelerator_type}", f"--version={version}"]
              + (["--spot"] if args.spot else []) + (["--preemptible"] if args.preemptible else [])
              + optional)
    return [("run", create)]


def plan_install(args) -> list:
    _need(args, "install", "tpu_name", "zone")
    repo = remote_path(args.remote_dir)
    pip = f"cd {repo} && {q(args.python)} -m pip install -e . {q(args.jax_tpu)}"
    if args.repo_url:
        # Clone once; on a rerun fetch the branch and check it out (local runs/ stay untouched).
        url, branch = q(args.repo_url), q(args.branch)
        get = (f"if [ -d {repo}/.git ]; then git -C {repo} fetch origin {branch} && "
               f"git -C {repo} checkout --force FETCH_HEAD; "
               f"else git clone --branch {branch} {url} {repo}; fi")
        return [("run", ssh(args, f"set -e; {get}; {pip}"))]
    # No REPO_URL: upload this checkout's committed HEAD (git archive: no runs/, no .git).
    archive = os.path.join(tempfile.gettempdir(), "phimr_jax-src.tar.gz")
    name = os.path.basename(archive)
    unpack = f"{make_dir(repo)} && tar -xzf {name} -C {repo} && rm -f {name}"
    return [("run", ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz",
                     f"--output={archive}", "HEAD"]),
            ("run", scp(args, archive, name)),
            ("run", ssh(args, f"set -e; {unpack}; {pip}"))]


# gcsfuse from Google's apt repository (the TPU VM images are Ubuntu).
GCSFUSE_INSTALL = (
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
    'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
    "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
    "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
    "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse")


def plan_copy_data(args) -> list:
    _need(args, "copy-data", "tpu_name", "zone", "data_src")
    src, dst = args.data_src, remote_path(args.data_dst)
    if args.data_mode == "mount":
        if not src.startswith("gs://"):
            raise UsageError("--data-mode=mount needs a gs:// DATA_SRC")
        bucket, _, prefix = src[len("gs://"):].rstrip("/").partition("/")
        only_dir = f"--only-dir {q(prefix)} " if prefix else ""
        mount = (f"set -e; command -v gcsfuse >/dev/null || ({GCSFUSE_INSTALL}); "
                 f"{make_dir(dst)}; mountpoint -q {dst} || "
                 f"gcsfuse --implicit-dirs {only_dir}{q(bucket)} {dst}")
        return [("run", ssh(args, mount))]
    if args.data_mode != "copy":
        raise UsageError(f"--data-mode must be copy or mount, not {args.data_mode!r}")
    # Either way the data lands in DATA_DST/<basename of DATA_SRC>.
    if src.startswith("gs://"):
        # Every worker pulls from GCS itself (the workers' service account needs read access).
        return [("run", ssh(args, f"{make_dir(dst)} && gcloud storage cp -r "
                                  f"{q(src)} {dst}"))]
    # A local path: make DATA_DST on every worker, then scp into it (same layout as above).
    return [("run", ssh(args, make_dir(dst))),
            ("run", scp(args, src, args.data_dst.rstrip("/") + "/", recurse=os.path.isdir(src)))]


def main_command(args) -> str:
    """The phimr_jax.main command line every worker runs."""
    extra = shlex.split(args.extra_args or "") + list(args.trailing)
    argv = [args.python, "-m", "phimr_jax.main", f"--config={args.config}", "--distributed"]
    return q_join(argv + extra)


def plan_launch(args) -> list:
    _need(args, "launch", "tpu_name", "zone", "config")
    logs, repo = remote_path(args.log_dir), remote_path(args.remote_dir)
    env = q_join(shlex.split(args.env or ""))
    run = (f"nohup env {env} " if env else "nohup ") + main_command(args)
    # One log per worker (TPU VM hostnames end in -w-<index>), appended across relaunches;
    # the pid file is what `stop` kills. No fd stays open, so ssh returns at once.
    start = (f"set -e; cd {repo}; {make_dir(logs)}; "
             f"{run} >> {logs}/$(hostname).log 2>&1 < /dev/null & "
             f"echo $! > {logs}/$(hostname).pid; echo started $(hostname) pid $!")
    return [("run", ssh(args, start))]


def plan_logs(args) -> list:
    _need(args, "logs", "tpu_name", "zone")
    logs = remote_path(args.log_dir)
    if not str(args.lines).isdigit():
        raise UsageError(f"--lines must be a number, not {args.lines!r}")
    follow = " -F" if args.follow else ""
    return [("run", ssh(args, f"tail -n {args.lines}{follow} {logs}/*.log",
                        worker=args.worker))]


def plan_stop(args) -> list:
    _need(args, "stop", "tpu_name", "zone")
    pid = f"{remote_path(args.log_dir)}/$(hostname).pid"
    return [("run", ssh(args, f"if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null "
                              f"&& echo stopped $(hostname) || true; rm -f {pid}; fi"))]


def plan_teardown(args) -> list:
    _need(args, "teardown", "tpu_name", "zone")
    if args.queued:
        # --force deletes the node together with its queued resource.
        return [("run", GCLOUD_TPU + ["queued-resources", "delete", queued_id(args)]
                 + _where(args) + ["--force", "--quiet"])]
    return [("run", GCLOUD_TPU + ["tpu-vm", "delete", args.tpu_name] + _where(args)
             + ["--quiet"])]


def plan_all(args) -> list:
    _need(args, "all", "tpu_name", "zone", "accelerator_type")
    steps = plan_create(args) + plan_install(args)
    if args.data_src:
        steps += plan_copy_data(args)
    return steps + plan_launch(args)


PLANS = {"create": plan_create, "install": plan_install, "copy-data": plan_copy_data,
         "launch": plan_launch, "logs": plan_logs, "stop": plan_stop,
         "teardown": plan_teardown, "all": plan_all}


# ----------------------------------------------------------------------------- running
def wait_active(argv: list[str]) -> None:
    """Poll a queued resource until ACTIVE (its TPU VM exists); fail on FAILED/SUSPENDED."""
    while True:
        state = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        print(f"queued resource state: {state or '?'}", file=sys.stderr)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
            raise SystemExit(f"error: queued resource ended in state {state}")
        time.sleep(POLL_SECONDS)


def execute(steps: list, dry_run: bool) -> int:
    if dry_run:
        for _, argv in steps:
            print(shlex.join(argv))
        return 0
    if any(argv[0] == "gcloud" for _, argv in steps) and shutil.which("gcloud") is None:
        raise UsageError("gcloud not found on PATH (install the Google Cloud CLI, or use "
                         "--dry-run to print the commands)")
    for kind, argv in steps:
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        if kind == "wait":
            wait_active(argv)
            continue
        try:
            rc = subprocess.run(argv).returncode
        except KeyboardInterrupt:  # Ctrl-C out of `logs`
            return 130
        if rc != 0:
            print(f"error: exit status {rc} from: {shlex.join(argv)}", file=sys.stderr)
            return rc
    return 0


def _warn_if_dirty() -> None:
    """The upload is `git archive HEAD`: say so when the checkout has uncommitted changes."""
    status = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "-uno"],
                            capture_output=True, text=True).stdout
    if status.strip():
        print("warning: uploading the committed HEAD; uncommitted changes stay here",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare `--` goes to phimr_jax.main unchanged.
    trailing = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trailing = argv[:cut], argv[cut + 1:]
    try:
        args = build_parser().parse_args(argv)
        args.trailing = trailing
        if args.command in ("install", "all") and not args.repo_url and not args.dry_run:
            _warn_if_dirty()
        return execute(PLANS[args.command](args), args.dry_run)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
