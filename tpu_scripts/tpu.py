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
import time

# tpu.py runs as a script: find tpu_plan.py next to it, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpu_plan import PLANS, REPO_ROOT, UsageError  # noqa: E402

SUBCOMMANDS = ("create", "install", "copy-data", "launch", "logs", "stop", "teardown", "all")
# Polling of a queued resource until its node exists (real runs only).
POLL_SECONDS = 30


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
