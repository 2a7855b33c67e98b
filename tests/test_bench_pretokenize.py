"""bench/pretokenize.py cannot rot: a small run through its real path (local Ray, the
worker pipeline, the stages alone) prints every key the README's table reads, and its
inputs are what its options ask for."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "pretokenize.py"
_spec = importlib.util.spec_from_file_location("bench_pretokenize", BENCH)
bench_pretokenize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_pretokenize)


def test_inputs_have_the_asked_size_and_format(tmp_path):
    paths = bench_pretokenize.write_inputs(tmp_path, 5, (100, 80), "jpeg")
    assert len(paths) == len(set(paths)) == 5
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (100, 80), "RGB")
        assert path.parent.parent == tmp_path / "train"  # ImageNet-style: train/<class>/<file>


def test_a_bad_input_size_is_a_one_line_error():
    done = subprocess.run([sys.executable, str(BENCH), "--input-size", "500"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--input-size '500': give WIDTHxHEIGHT" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_small_run_reports_every_figure():
    command = [sys.executable, str(BENCH), "--json", "--images", "64", "--batch-size", "16",
               "--shard-size", "32", "--rounds", "1", "--input-size", "96x80", "--input-format", "jpeg"]
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)  # stdout is the JSON alone
    for key in ("decode_images_per_s", "encode_images_per_s", "encode_one_process_images_per_s",
                "pipeline_images_per_s", "pipeline_images_per_s_1", "pipeline_images_per_s_2"):
        assert result[key] > 0, key
    assert -1 < result["pipeline_overhead_per_cpu_s"] < 1
    # The shared-CPU ceiling is below the slower stage's rate, so the pipeline is a larger
    # fraction of it (both ratios are rounded to 3 decimals).
    assert 0 < result["pipeline_over_slower_stage"] <= result["pipeline_over_shared_cpus_ceiling"] + 0.001
    assert result["scaling_2_over_1"] > 0
    assert (result["images"], result["inputs"], result["resolution"]) == (64, "jpeg 96x80", 32)
    assert result["tokenizer"] == "tiny-tokenizer (seed 0)"
