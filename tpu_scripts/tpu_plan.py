"""The command plans of tpu.py: for each subcommand, the gcloud / git / ssh command lines it
runs, as a list of steps (stdlib only; nothing here runs a command).

`PLANS[subcommand](args)` turns the parsed options of tpu.py into steps (kind, argv); tpu.py
prints them (--dry-run) or runs them. Also here: the shell quoting of the workers' commands,
the gcloud ssh / scp command lines, the default runtime version per TPU generation, and
`UsageError` (a missing or inconsistent parameter), which tpu.py reports as one line.
"""

from __future__ import annotations

import os
import shlex
import tempfile

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


class UsageError(Exception):
    """A missing or inconsistent parameter: printed as one line, exit status 2."""


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
