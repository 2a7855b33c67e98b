"""Typed configs: presets + overrides, one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from enat.cluster.config import load_config, parse_overrides
from enat.models.typed_config import ConfigError, check, from_dict, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    stage: Literal[0, 1, 2, 3] = 2

    def __post_init__(self):
        check(self.lr > 0, "lr", "> 0", self.lr)


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    resume: str | None = None


def test_overrides_parse_to_nested_typed_values():
    assert parse_overrides(["inner.lr=0.5", "steps=5", "name=abc", "tags=[a, b]"]) == {
        "inner": {"lr": 0.5}, "steps": 5, "name": "abc", "tags": ["a", "b"]}
    config = load_config(Outer, None, ["inner.stage=3", "inner.lr=3e-4", "steps=7", "resume=s3://b/c"])
    assert config == Outer(steps=7, inner=Inner(lr=3e-4, stage=3), resume="s3://b/c")
    assert from_dict(Outer, to_dict(config)) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["bogus=1"], "unknown key 'bogus'"),
        (["inner.bogus=1"], "unknown key 'inner.bogus'"),
        (["steps=abc"], "bad value for 'steps': expected int"),
        (["steps=1.5"], "bad value for 'steps'"),
        (["inner.stage=4"], "'inner.stage': expected one of 0, 1, 2, 3"),
        (["inner.lr=-1"], "bad value for 'inner.lr': must be > 0"),
        (["inner=3"], "bad value for 'inner'"),
        (["noequals"], "expected key=value"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_preset_file_and_unknown_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 3\ninner:\n  lr: 0.5\n")
    assert load_config(Outer, str(preset), ["steps=4"]) == Outer(steps=4, inner=Inner(lr=0.5))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(Outer, "nope")


def test_cli_exits_2_naming_the_bad_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "enat.cluster.cli", "data", "demo", "--out", str(tmp_path / "x"), "bogus=1"],
        capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "enat: error: unknown key 'bogus'; allowed keys: cc3m_shard_size, limit, out, seed"]
    assert not (tmp_path / "x").exists()


def test_cli_help_lists_every_command_with_one_line():
    result = subprocess.run([sys.executable, "-m", "enat.cluster.cli", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "services", "data"):
        assert any(line.strip().startswith(command) for line in result.stdout.splitlines())


# Every command's parser and config class loads, and `enat train --help` answers, in a fresh
# interpreter: none of that may import the heavy libraries (help must answer in well under 1 s).
HELP_PROBE = """
import contextlib, io, sys
from enat.cluster.cli import build_parser, main
build_parser()
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["train", "--help"])
heavy = ("torch", "deepspeed", "ray", "mlflow", "torch_fidelity", "pyarrow")
print(",".join(name for name in heavy if name in sys.modules))
"""


def test_the_cli_builds_every_command_without_importing_torch():
    result = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("argv, message", [
    (["search", "/tmp/not-a-run/step-1", "reference=r.npz"], "set out=<URL>"),
    (["submit", "--"], "nothing to submit"),
    (["eval", "watch", "/tmp/not-a-run", "reference=r.npz"], "a training run folder"),
])
def test_user_errors_of_any_command_exit_2_with_one_line(argv, message, capsys):
    from enat.cluster.cli import main

    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("enat: error: ") and message in error[0]


def test_eval_group_takes_a_checkpoint_directly():
    from enat.cluster.cli import all_commands, with_default_subcommand

    groups, _, defaults = all_commands()
    assert with_default_subcommand(["eval", "s3://b/ck", "x=1"], groups, defaults) == [
        "eval", "checkpoint", "s3://b/ck", "x=1"]
    assert with_default_subcommand(["--state-dir", "s", "eval", "u"], groups, defaults) == [
        "--state-dir", "s", "eval", "checkpoint", "u"]
    assert with_default_subcommand(["eval", "floor", "x=1"], groups, defaults) == ["eval", "floor", "x=1"]


def test_a_model_section_is_a_union_keyed_by_kind_and_may_name_a_preset(tmp_path):
    from enat.cluster.config import preset_path, read_yaml
    from enat.cluster.jobs import TrainJob
    from enat.models.config import ENATConfig, NATConfig
    from enat.models.typed_config import from_dict, to_dict

    preset = tmp_path / "job.yaml"
    preset.write_text("model: models/tiny-enat\nmasking:\n  reuse_prob: 0.0\n")
    job = load_config(TrainJob, str(preset), ["model.width=32"])
    assert isinstance(job.model, ENATConfig) and job.model.width == 32  # the preset's other keys stay
    assert job.model.encoder_depth == read_yaml(preset_path("models/tiny-enat"))["encoder_depth"]
    replaced = load_config(TrainJob, str(preset), ["model=models/tiny-nat"])
    assert isinstance(replaced.model, NATConfig)
    # The object round-trips through its plain form, kind included: what a checkpoint records.
    assert to_dict(job)["model"]["kind"] == "enat"
    assert from_dict(TrainJob, to_dict(job)) == job
    with pytest.raises(ConfigError, match="'model.kind': expected one of 'enat', 'nat', got 'gan'"):
        load_config(TrainJob, str(preset), ["model.kind=gan"])
    with pytest.raises(ConfigError, match="bad value for 'kind': expected one of 'nat', got 'enat'"):
        from_dict(NATConfig, {"kind": "enat"})


def test_num_workers_takes_a_number_or_an_elastic_range():
    from enat.cluster.jobs import TrainJob, TrainSearchJob

    fixed = load_config(TrainJob, "train/tiny-enat-demo", ["launch.num_workers=3"])
    assert fixed.launch.worker_range == (3, 3) and not fixed.launch.elastic
    assert fixed.loop_config().global_batch == 0  # set at the run's first start
    elastic = load_config(TrainJob, "train/tiny-enat-demo",
                          ["launch.num_workers=2-8", "batch_size=16", "grad_accum=2"])
    assert elastic.launch.worker_range == (2, 8) and elastic.launch.elastic
    assert elastic.loop_config().global_batch == 16 * 2 * 8  # the largest size's: every size keeps it
    for bad in ("8-2", "0-2", "two", "2-"):
        with pytest.raises(ConfigError, match="launch.num_workers"):
            load_config(TrainJob, "train/tiny-enat-demo", [f"launch.num_workers={bad}"])
    with pytest.raises(ConfigError, match="one number in search-train"):
        load_config(TrainSearchJob, "train/tiny-enat-demo", ["launch.num_workers=1-2"])


@pytest.mark.parametrize("overrides, message", [
    (["launch.num_workers=0"], "bad value for 'launch.num_workers': must be >= 1"),
    (["launch.num_workers=4-2"], "bad value for 'launch.num_workers': must be >= 1 (MIN-MAX: 1 <= MIN"),
    (["launch.num_workers=1-2-3"], "bad value for 'launch.num_workers': must be a number or MIN-MAX"),
    (["launch.num_workers=1.5"], "bad value for 'launch.num_workers': expected int or str"),
    (["launch.resize_check_s=0"], "bad value for 'launch.resize_check_s': must be > 0"),
    (["data.readers=0"], "bad value for 'data.readers': must be >= 1"),
    (["validation.samples=-1"], "bad value for 'validation.samples': must be >= 0"),
])
def test_bad_job_settings_are_one_line_naming_the_key_once(overrides, message):
    from enat.cluster.jobs import TrainJob

    with pytest.raises(ConfigError) as info:
        load_config(TrainJob, "train/tiny-enat-demo", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_search_settings_name_the_key_once():
    from enat.cluster.jobs import TrainSearchJob

    with pytest.raises(ConfigError, match=r"^bad value for 'search.trials': must be >= 1"):
        load_config(TrainSearchJob, "train/tiny-enat-demo", ["search.trials=0"])
    with pytest.raises(ConfigError, match=r"^bad value for 'launch.num_workers': must be one number"):
        load_config(TrainSearchJob, "train/tiny-enat-demo", ["launch.num_workers=1-2"])
