"""`enat demo`'s plan and summary. The whole demo runs as `make demo` (its figures are in
the README); here: every stage's command is valid for the real CLI, a stage whose output
exists is skipped, a failing stage stops the demo with a clear error, and the summary
reads the stages' own outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from enat.cluster.cli import command_config, parse
from enat.cluster.demo import DemoError, Stage, run_stage, stages
from enat.cluster.demo_config import DemoConfig, DemoPaths
from enat.cluster.demo_summary import collect, render
from enat.pipelines import storage
from enat.pipelines.shards import Manifest, TokenSample, write_manifest, write_shard


def test_every_stage_command_is_valid_for_the_cli(tmp_path):
    config = DemoConfig(work_dir=str(tmp_path / "out"))
    planned = stages(config, DemoPaths(config))
    assert len(planned) == 15
    with_four = DemoConfig(work_dir=str(tmp_path / "out"), search_steps=[8, 4])
    titles = [stage.title for stage in stages(with_four, DemoPaths(with_four))]
    assert len(titles) == 17 and "AutoNAT search, 4 steps" in titles
    assert "final evaluation on fresh seeds: searched-4" in titles
    assert planned[0].beside_next and not any(stage.beside_next for stage in planned[1:])
    for stage in planned:
        job = command_config(parse(stage.args))  # raises ConfigError on a bad key or value
        if stage.args[0] == "train":
            assert job.launch.num_workers == 2 and job.zero_stage == 2
            assert job.eval.watch == (job.run == "tiny-enat-demo")


def test_done_stages_are_skipped_and_failures_stop_the_demo(capsys):
    run_stage(Stage("finished", lambda: True, ["no-such-command"]))
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(DemoError, match="stage 'broken' failed"):
        run_stage(Stage("broken", lambda: False, ["data", "demo", "bogus=1"]))


def test_summary_reads_the_stage_outputs(tmp_path):
    config = DemoConfig(work_dir=str(tmp_path), root=str(tmp_path / "root"), skip_text=True,
                        search_steps=[8, 4])
    paths = DemoPaths(config)
    for name, fid, steps in (("default-8", 4.0, 8), ("searched-8", 3.0, 8), ("searched-4", 3.5, 4),
                             ("nat-default-8", 5.0, 8)):
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "fid": fid, "kid": 0.01, "steps": steps, "extractor_id": "domain-abc", "num_samples": 1000,
            "class_consistency": fid / 10, "classifier_real_accuracy": 0.7,
            "gflops_per_image": 0.1 * steps, "gflops_per_image_with_decoder": 0.2 * steps,
            "images_per_s": 50.0, "grid": str(folder / "grid.png")}))
    (tmp_path / "floor.json").write_text(json.dumps({"fid": 0.5, "kid": 0.0, "num_samples": 950,
                                                     "reference_images": 951}))
    # Training figures: ids spread evenly over 4 of 16 codes (unigram entropy ln 4), and the
    # ENAT run's final checkpoint marker with its last metrics (the NAT run has none).
    tokens = np.arange(4, dtype=np.uint16).repeat(16).reshape(8, 8)
    write_shard(storage.join(paths.tokens, "train", "shard-000000.tar"),
                [TokenSample(key=f"s{i}", tokens=np.roll(tokens, i), label=0) for i in range(3)])
    write_manifest(paths.tokens, Manifest("vq-x", "0" * 64, 32, [8, 8], 16, classes=["a"],
                                          splits={"train": [{"name": "shard-000000.tar", "count": 3}]}))
    storage.write_bytes(storage.join(paths.checkpoint(paths.run, config.train_steps), "checkpoint.json"),
                        json.dumps({"metrics": {"loss": 2.5, "val_loss": 1.25}}).encode())
    # An 8-step search by kind: two updates (4 differences each), the last step's point, and
    # two results of an interrupted update: 5 + 5 + 1 + 2 evaluations.
    history = [{"update": 0, "base_fid": 5.0, "gradient": [1.0] * 4}, {"update": 1, "base_fid": 4.0,
               "gradient": [1.0] * 4}, {"update": 2, "base_fid": 3.0, "gradient": None}]
    storage.write_bytes(storage.join(paths.search(8), "search_state.json"),
                        json.dumps({"history": history, "results": {"3:-1": 3.0, "3:0": 3.1}}).encode())
    figures = collect(config, paths)
    assert figures["search"][8]["evaluations"] == 13 and figures["search"][4]["evaluations"] == 0
    assert figures["classifier_real_accuracy"] == 0.7 and not figures["final"]["text"]
    assert figures["training"]["unigram_entropy"] == pytest.approx(math.log(4))
    assert figures["training"]["enat"] == {"loss": 2.5, "val_loss": 1.25} and "nat" not in figures["training"]
    table = render(figures, "sqlite:///x.db", 600.0)
    assert "| searched-8 | 8 | 1000 | 3.000 | 0.0100 | 0.300 |" in table
    assert "| real vs real (floor) | - | 950 vs 951 | 0.500 | 0.0000 | 0.700 (classifier" in table
    assert "FID 3.000 vs 4.000 (+25.0% better)" in table
    assert "FID 4.000 vs 5.000, class consistency 0.400 vs 0.500" in table
    assert "ENAT training: loss 2.500 (last logging window), val_loss 1.250 (EMA, no smoothing) vs the " \
           "unigram entropy of the training ids 1.386 (uniform 2.773)" in table
    assert "mlflow ui --backend-store-uri sqlite:///x.db" in table


def test_a_stage_beside_the_next_runs_in_the_background_and_its_failure_names_its_log(tmp_path, capsys):
    from enat.cluster.demo import run_beside

    broken = Stage("broken", lambda: False, ["data", "demo", "bogus=1"], beside_next=True)
    with pytest.raises(DemoError, match=r"stage 'broken' failed \(exit 2\) \(its output: .*data-demo.log\)"):
        run_beside(broken, Stage("next", lambda: True, ["no-such-command"]), tmp_path / "logs")
    assert "bogus" in (tmp_path / "logs" / "data-demo.log").read_text()
    output = capsys.readouterr().out
    assert "in the background" in output and "done before: skipped" in output


def test_a_rerun_with_nothing_to_do_keeps_the_times_of_the_run_that_made_the_outputs(tmp_path):
    from enat.cluster.demo import previous_timings

    config = DemoConfig(work_dir=str(tmp_path))
    assert previous_timings(config) is None  # no summary yet: this run's times count
    (tmp_path / "summary.json").write_text(json.dumps({"demo_seconds": 1164.0,
                                                       "stage_seconds": {"tokenizer training": 148.0}}))
    assert previous_timings(config) == (1164.0, {"tokenizer training": 148.0})
