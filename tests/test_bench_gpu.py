"""bench/gpu.py cannot rot: its tiny mode runs every path of the GPU run on the CPU (golden
checks, SDPA probe, matmul peak, the trainer's step eager and compiled under ZeRO-0 and
ZeRO-2, the sampler, the VQGAN) and must write every key with a sane value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from enat.models.golden import fixture_folder

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("enat-s", "enat-b", "enat-l")
RUNS = ("eager_zero0", "eager_zero2", "compiled_zero0", "compiled_zero2")
GENERATED = ("enat-l_reuse", "enat-l_noreuse", "autonat-l")

pytestmark = pytest.mark.skipif(not (fixture_folder() / "cases.json").is_file(),
                                reason=f"reference fixtures not found at {fixture_folder()}")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-gpu") / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, float | int) and value > 0


def test_run_is_described(report):
    assert report["mode"] == "tiny" and report["device"] == "cpu"
    assert report["precision"].startswith("bf16") and report["compile_backend"]
    assert positive(report["wall_time_s"])
    assert set(report["section_seconds"]) == {"golden", "sdpa", "peak", "train", "generate", "vqgan"}


def test_golden_checks_pass_in_fp32_and_bf16(report):
    for precision in ("fp32", "bf16_autocast"):
        golden = report["golden"][precision]
        assert golden["passed"] and golden["outputs_failed"] == 0 and not golden["failed"], golden
        assert golden["outputs_checked"] >= 40
    assert report["golden"]["fp32"]["rtol"] < report["golden"]["bf16_autocast"]["rtol"]


def test_sdpa_backend_named_for_every_model(report):
    assert set(report["sdpa_backend"]) == {"enat-s", "enat-b", "enat-l", "autonat-l"}
    for entry in report["sdpa_backend"].values():
        assert entry["backends"] and all(isinstance(name, str) for name in entry["backends"])
        assert positive(entry["head_dim"]) and positive(entry["heads"]) and positive(entry["tokens"])


def test_train_rates_and_mfu(report):
    assert positive(report["matmul_peak_bf16_tflops"])
    assert set(report["train"]) == set(TRAINED)
    for name in TRAINED:
        entry = report["train"][name]
        assert positive(entry["batch_size_per_gpu"]) and positive(entry["timed_steps"])
        for run in RUNS:
            figures = entry[run]
            assert "error" not in figures, (name, run, figures)
            for key in ("samples_per_s", "step_time_s", "build_and_warmup_s", "train_gflops_per_sample"):
                assert positive(figures[key]), (name, run, key)
            assert 0 < figures["mfu_vs_measured_bf16_peak"] <= 1, (name, run)


def test_generation_and_vqgan_rates(report):
    assert set(report["generate"]) == set(GENERATED)
    for entry in report["generate"].values():
        rates = [value for key, value in entry.items() if key.endswith("_images_per_s")]
        assert len(rates) == 2 and all(positive(rate) for rate in rates)
        assert entry["steps"] == 8 and entry["cfg"] and entry["includes_vq_decode"]
    vqgan = report["vqgan"]
    assert positive(vqgan["resolution_px"]) and positive(vqgan["batch"])
    assert positive(vqgan["encode_images_per_s"]) and positive(vqgan["decode_images_per_s"])
