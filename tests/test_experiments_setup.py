"""How the experiments start their cloud and record what they ran on (no measurement here)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from splitinfer.cli import add_model_args, add_testbed_args
from splitinfer.experiments import testbed
from splitinfer.local import LocalSide
from splitinfer.models import ModelError, prepare_default_model


@pytest.fixture(scope="module")
def local(default_model) -> LocalSide:
    return LocalSide(default_model, kernels="torch")


def test_a_cloud_started_beside_the_local_side_computes_like_it(local):
    assert local.cloud_args() == ["--device", "cpu", "--dtype", "float32", "--kernels", "torch"]
    # Another device for the cloud (a GPU, as deployed): its own default dtype, the same kernels.
    assert local.cloud_args("cuda") == ["--device", "cuda", "--kernels", "torch"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_model_args(p)
    add_testbed_args(p)
    p.add_argument("--out")
    return p


def test_testbed_for_passes_the_command_line_on(monkeypatch):
    seen = {}
    monkeypatch.setattr(testbed, "testbed", lambda model, **kw: seen.update(model=model, **kw))
    args = parser().parse_args(
        ["--model", "m", "--device", "cpu", "--dtype", "float32", "--kernels", "torch", "--threads", "2",
         "--cloud-threads", "3", "--cloud-device", "cuda"]
    )
    testbed.testbed_for(args, rtt_ms=80)
    assert seen == {"model": args.model, "cloud": None, "cloud_threads": 3, "local_threads": 2, "kernels": "torch",
                    "device": "cpu", "dtype": "float32", "cloud_device": "cuda", "rtt_ms": 80}


def test_settings_record_the_resolved_device_dtype_and_threads(local):
    args = parser().parse_args(["--out", "x.json", "--kernels", "torch"])
    got = testbed.settings(args, local)
    assert got["device"] == "cpu" and got["dtype"] == "float32" and got["local_threads"] == 1
    assert got["kernels"] == "torch" and "out" not in got and "model" not in got


def test_prepare_model_refuses_a_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF"):
        prepare_default_model(tmp_path / "out", tmp_path / "absent.gguf")
    cmd = [sys.executable, "-m", "splitinfer", "prepare-model", "--gguf", str(tmp_path / "absent.gguf"),
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "no such GGUF file" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
