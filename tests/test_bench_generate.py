"""bench/generate.py's --compile path on a tiny ENAT: a backend that cannot be used is
reported (stderr line, compile_error) and the bench goes on; a working one is timed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from enat.models import ENATConfig, build_model
from enat.models.strategy import Strategy

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)


def tiny():
    torch.manual_seed(0)
    return build_model(ENATConfig(codebook_size=32, grid_size=4, width=32, heads=2, num_classes=3,
                                  encoder_depth=2, decoder_depth=1)).eval()


def test_an_unusable_backend_is_reported_and_skipped(capsys):
    result = bench_generate.compiled_rates(tiny(), Strategy.default(4), 2, 1, "no-such-backend")
    assert result["compile_backend"] == "no-such-backend" and result["compile_error"]
    assert "compiled_images_per_s" not in result
    assert "torch.compile(backend='no-such-backend') failed" in capsys.readouterr().err


def test_a_working_backend_is_timed_against_eager():
    # Dynamo's "eager" backend: the same graph capture and guards, no C compiler needed.
    result = bench_generate.compiled_rates(tiny(), Strategy.default(4), 2, 1, "eager")
    assert "compile_error" not in result
    assert result["compile_s"] > 0 and result["compiled_images_per_s"] > 0 and result["compile_speedup"] > 0
