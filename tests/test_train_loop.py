"""The training loop on real DeepSpeed over gloo: two torchrun processes (ZeRO-0, ZeRO-2 and
ZeRO-3 runs; an elastic run trained on 2 workers at ZeRO-2, resumed on 1 worker at ZeRO-1
with grad_accum 2, then on 2 workers at ZeRO-3 through `enat train` under torchrun) and one
plain process (the NAT baseline, resume from another run's checkpoint, an unreachable MLflow,
a corrupt shard). Every run is fp32 on CPU, so a resumed run must repeat the uninterrupted
one (up to the order of reductions when the world size changes)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from enat.cluster.cli import main
from enat.models import build_config, build_model
from enat.pipelines import runs, storage
from enat.pipelines.model_io import load_model
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
ENAT = {"kind": "enat", "codebook_size": 64, "grid_size": 4, "width": 32, "heads": 2, "encoder_depth": 2,
        "decoder_depth": 1, "num_classes": 5}
NAT = {"kind": "nat", "codebook_size": 64, "grid_size": 4, "width": 32, "heads": 2, "depth": 2,
       "num_classes": 5}
STEPS, STOP, SECOND_STOP = 16, 7, 11

# Runs the loop in each process of a launcher (torchrun, or a plain python process):
# argv = preset, output folder, then runs as "name|until_step|override,override,...".
RUNNER = """
import json, sys
from enat.cluster.config import load_config
from enat.cluster.jobs import TrainJob
from enat.trainer.loop import train
preset, out = sys.argv[1], sys.argv[2]
for spec in sys.argv[3:]:
    name, until, overrides = spec.split("|")
    config = load_config(TrainJob, preset, [f"run={name}", *filter(None, overrides.split(","))]).loop_config()
    result = train(config, until_step=int(until) or None)
    with open(f"{out}/{name}-{result.step}-rank{__import__('os').environ['RANK']}.json", "w") as f:
        json.dump({"losses": result.losses, "resumed_from": result.resumed_from}, f)
"""


def write_preset(tmp_path: Path, model: dict, **values) -> Path:
    config = {"root": str(tmp_path / "root"), "model": model, "seed": 1, "steps": STEPS,
              "batch_size": 6, "lr": 2e-3, "warmup_steps": 2, "precision": "fp32", "ema_decay": 0.9,
              "log_every": 1, "checkpoint_every": STOP, "keep_last": 3, "mlflow_experiment": "tests",
              "data": {"url": str(tmp_path / "data"), "readers": 2, "shuffle_window": 16},
              **values}
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def loss_history(tmp_path: Path, run_name: str, metric: str = "loss") -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    mlflow_runs = client.search_runs([experiment.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    assert len(mlflow_runs) == 1, f"expected one MLflow run named {run_name}, found {len(mlflow_runs)}"
    history = client.get_metric_history(mlflow_runs[0].info.run_id, metric)
    assert len(history) == len({m.step for m in history})  # each step logged once
    return {m.step: m.value for m in history}


def world_sizes(tmp_path: Path, run_name: str) -> dict[int, float]:
    return loss_history(tmp_path, run_name, "world_size")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """ZeRO-0, ZeRO-2 and ZeRO-3 runs on 2 workers, and the elastic run: 2 workers at ZeRO-2
    to STOP, 1 worker at ZeRO-1 to SECOND_STOP, then 2 workers at ZeRO-3 through `enat train`
    under torchrun, each part in fresh processes."""
    tmp_path = tmp_path_factory.mktemp("two-process")
    write_synthetic_shards(str(tmp_path / "data"), SyntheticSpec(grid=4, codebook_size=64, num_classes=5,
                                                                  samples=160, per_shard=16))
    preset = write_preset(tmp_path, ENAT)
    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "out").mkdir()
    env = environment(tmp_path)
    run(torchrun(str(tmp_path / "runner.py"), str(preset), str(tmp_path / "out"), "z0|0|zero_stage=0",
                 "z2|0|zero_stage=2", "z3|0|zero_stage=3", f"elastic|{STOP}|zero_stage=2"), env)
    one = run([sys.executable, str(tmp_path / "runner.py"), str(preset), str(tmp_path / "out"),
               f"elastic|{SECOND_STOP}|zero_stage=1"], {**env, "RANK": "0"})
    resumed = run(torchrun("-m", "enat.cluster.cli", "train", "--config", str(preset), "run=elastic",
                           "zero_stage=3"), env)
    return tmp_path, one, resumed


@pytest.mark.slow
def test_a_run_resumed_on_other_world_sizes_and_zero_stages_repeats_the_uninterrupted_run(two_process_runs):
    tmp_path, one, resumed = two_process_runs
    root = str(tmp_path / "root")
    first_stop = runs.step_url(root, "elastic", STOP)
    assert f"resumed from {first_stop} (step {STOP}, written by 2 workers at ZeRO-2)" in one.stdout
    assert "global batch 12 on 1 workers: grad_accum 2 x batch_size 6 per worker" in one.stdout
    assert f"resumed from {runs.step_url(root, 'elastic', SECOND_STOP)} (step {SECOND_STOP}, written by 1 " \
           f"workers at ZeRO-1)" in resumed.stdout
    straight, elastic = loss_history(tmp_path, "z2"), loss_history(tmp_path, "elastic")
    assert sorted(straight) == sorted(elastic) == list(range(1, STEPS + 1))  # each step logged once
    for step, loss in straight.items():
        assert elastic[step] == pytest.approx(loss, rel=1e-5), step
    sizes = world_sizes(tmp_path, "elastic")
    assert sizes == {s: 2.0 if s <= STOP or s > SECOND_STOP else 1.0 for s in range(1, STEPS + 1)}

    final = {name: load_model(runs.latest(root, name).ema_url).model.state_dict()
             for name in ("z2", "elastic")}
    gap = max(float((final["z2"][k] - final["elastic"][k]).abs().max()) for k in final["z2"])
    assert gap < 1e-5, f"the elastic run's EMA differs from the uninterrupted one's by {gap}"


@pytest.mark.slow
def test_zero3_ema_equals_zero0_ema_and_exports_load_without_deepspeed(two_process_runs):
    tmp_path, *_ = two_process_runs
    root = str(tmp_path / "root")
    emas = {}
    for name in ("z0", "z3"):
        latest = runs.latest(root, name)
        assert latest.step == STEPS
        emas[name] = load_model(latest.ema_url)
    torch.manual_seed(1)
    initial = build_model(build_config({**ENAT, "cond_dropout": 0.0})).state_dict()
    z0, z3 = emas["z0"].model.state_dict(), emas["z3"].model.state_dict()
    moved = max(float((z0[k] - initial[k]).abs().max()) for k in z0)
    gap = max(float((z0[k] - z3[k]).abs().max()) for k in z0)
    assert moved > 1e-2  # the EMA followed training (decay 0.9)
    assert gap < 1e-5, f"ZeRO-3 EMA differs from ZeRO-0 EMA by {gap}"
    assert emas["z3"].config.cond_dropout == 0.1  # the export records the label drop applied


@pytest.mark.slow
def test_checkpoint_folder_layout_and_mlflow_record(two_process_runs):
    tmp_path, *_ = two_process_runs
    root = str(tmp_path / "root")
    complete, partial = runs.scan(root, "elastic")
    assert [c.step for c in complete] == [SECOND_STOP, 2 * STOP, STEPS] and partial == []  # keep_last=3
    files = set(complete[-1].meta["files"])
    assert files == {"ema/model.safetensors", "ema/config.json", "train_config.json",
                     "state/model.safetensors", "state/optimizer.safetensors"}
    meta = complete[-1].meta
    assert meta["data"] == {"samples": STEPS * 12, "global_batch": 12, "epoch_size": 160}
    assert (meta["adam_step"], meta["world_size"], meta["zero_stage"]) == (STEPS, 2, 3)
    for name in files:
        assert storage.exists(storage.join(complete[-1].url, name))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               "tags.`mlflow.runName` = 'elastic'")[0]
    assert found.data.tags["checkpoint.latest"] == complete[-1].url
    params = found.data.params  # logged at the run's first start
    assert params["zero_stage"] == "2" and params["model.width"] == "32"
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_s", "world_size",
            "grad_accum"} <= set(found.data.metrics)
    assert found.info.status == "FINISHED"


@pytest.mark.slow
def test_nat_baseline_resume_from_url_and_unreachable_mlflow(tmp_path):
    spec = SyntheticSpec(grid=4, codebook_size=64, num_classes=5, samples=96, per_shard=16)
    write_synthetic_shards(str(tmp_path / "data"), spec)
    bad = tmp_path / "data" / "train" / "shard-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[:1000] + b"\xff" * 200 + data[1200:])  # sha256 no longer matches
    preset = write_preset(tmp_path, NAT, masking={"reuse_prob": 0.0}, zero_stage=1, steps=12,
                          checkpoint_every=4, keep_last=2, p_uncond=0.2, tracking_wait=1)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = environment(tmp_path, MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    root = str(tmp_path / "root")
    fork = f"resume={runs.step_url(root, 'nat', 8)},steps=10"
    result = run([sys.executable, str(tmp_path / "runner.py"), str(preset), str(tmp_path),
                  "nat|0|", f"nat2|0|{fork}"], env)
    assert "warning: MLflow unreachable" in result.stderr
    assert "MLflow did not take 1 run" in result.stderr and "(metrics of steps 1-12)" in result.stderr
    assert "shard-000002.tar does not match its manifest sha256, its samples are replaced" in result.stderr
    assert [c.step for c in runs.scan(root, "nat")[0]] == [8, 12]  # keep_last=2
    first = json.loads((tmp_path / "nat-12-rank0.json").read_text())
    fork_result = json.loads((tmp_path / "nat2-10-rank0.json").read_text())
    assert fork_result["resumed_from"] == runs.step_url(root, "nat", 8)
    assert fork_result["losses"] == {k: first["losses"][k] for k in ("9", "10")}
    exported = load_model(runs.latest(root, "nat2").ema_url)
    assert type(exported.model).__name__ == "UViT" and exported.config.cond_dropout == 0.2


@pytest.mark.slow
@pytest.mark.integration
def test_two_trainers_on_one_run_one_trains_and_the_other_exits_2(tmp_path, s3_bucket):
    """Two `enat train` processes started together on one run on S3: one takes the run's lease
    and trains, the other exits 2 with one line naming the holder before it cleans or writes
    anything (a second writer's cleanup would delete the first one's checkpoint in progress),
    so every checkpoint kept stays complete and loadable."""
    write_synthetic_shards(str(tmp_path / "data"), SyntheticSpec(grid=4, codebook_size=64, num_classes=5,
                                                                  samples=64, per_shard=16))
    root = storage.join(s3_bucket, "root")
    preset = write_preset(tmp_path, NAT, root=root, run="shared", masking={"reuse_prob": 0.0}, zero_stage=0,
                          steps=8, checkpoint_every=2, keep_last=2, tracking=False,
                          lease={"heartbeat_seconds": 1.0, "stale_seconds": 60.0})
    command = [sys.executable, "-m", "enat.cluster.cli", "train", "--config", str(preset),
               "launch.launcher=process"]
    trainers = [subprocess.Popen(command, env=environment(tmp_path), cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [trainer.communicate(timeout=600) for trainer in trainers]
    assert sorted(t.returncode for t in trainers) == [0, 2], outputs
    winner, loser = sorted(range(2), key=lambda i: trainers[i].returncode)
    assert "run shared finished at step 8" in outputs[winner][0]
    errors = [line for line in outputs[loser][1].splitlines() if line.startswith("enat: error:")]
    run_url = runs.run_url(root, "shared")
    assert len(errors) == 1 and errors[0].startswith(
        f"enat: error: run 'shared' ({run_url}) is in use by train-"), outputs[loser]
    assert f", pid {trainers[winner].pid}, last heartbeat " in errors[0]
    assert "it is taken over once its heartbeat is 60 s old" in errors[0]
    complete, partial = runs.scan(root, "shared")
    assert [c.step for c in complete] == [6, 8] and partial == []
    for kept in complete:
        for name, digest in kept.meta["sha256"].items():
            assert hashlib.sha256(storage.read_bytes(storage.join(kept.url, name))).hexdigest() == digest
        assert type(load_model(kept.ema_url).model).__name__ == "UViT"
    assert not storage.exists(storage.join(run_url, "lease.json"))  # released at the end


def test_bad_inputs_fail_before_training(tmp_path, s3_bucket, capsys, monkeypatch):
    write_synthetic_shards(str(tmp_path / "data"), SyntheticSpec(grid=4, codebook_size=64, num_classes=5,
                                                                  samples=32, per_shard=16))
    preset = str(write_preset(tmp_path, ENAT))

    def fails(*overrides: str) -> str:
        assert main(["train", "--config", preset, "launch.launcher=process", *overrides]) == 2
        return capsys.readouterr().err

    mismatch = fails("data.tokenizer_id=vqgan-1234")
    assert "tokenizer 'synthetic-000000000000' != expected 'vqgan-1234'" in mismatch
    assert "codebook 64 != model's 128" in fails("model.codebook_size=128")
    assert "unknown key 'model.depth'" in fails("model.depth=3")
    assert "must be 0 for a NAT model" in fails("model=models/tiny-nat")
    root = str(tmp_path / "root")
    storage.write_bytes(storage.join(runs.step_url(root, "old", 5), runs.MARKER), b'{"step": 5}')
    assert "run 'old' already has checkpoints" in fails("run=old", "resume=never")
    assert "is not a complete checkpoint" in fails("run=new", f"resume={runs.step_url(root, 'old', 9)}")
    os.remove(tmp_path / "data" / "train" / "shard-000001.tar")
    assert "1 of 2 shards listed" in fails()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "enat-not-a-key")  # keys in the env win over the file
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert f"no permission to write {s3_bucket}/runs/" in fails(f"root={s3_bucket}")


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """A flipped byte, then a deleted file, in the newest checkpoint: resume warns, names
    it and continues from the one before, repeating the uninterrupted losses (fp32)."""
    write_synthetic_shards(str(tmp_path / "data"), SyntheticSpec(grid=4, codebook_size=64, num_classes=5,
                                                                  samples=96, per_shard=16))
    preset = write_preset(tmp_path, NAT, masking={"reuse_prob": 0.0}, zero_stage=0, steps=12,
                          checkpoint_every=4, keep_last=5)
    (tmp_path / "runner.py").write_text(RUNNER)
    env, root = environment(tmp_path), str(tmp_path / "root")
    runner = [sys.executable, str(tmp_path / "runner.py"), str(preset), str(tmp_path)]
    run([*runner, "whole|0|", "cut|8|"], env)
    straight = json.loads((tmp_path / "whole-12-rank0.json").read_text())["losses"]

    step8 = Path(runs.step_url(root, "cut", 8))
    states = step8 / "state" / "optimizer.safetensors"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    resumed = run([*runner, "cut|10|"], env)
    assert f"{step8.as_posix()} is damaged: state/optimizer.safetensors" in resumed.stderr
    assert "does not match its sha256; resuming from the previous checkpoint" in resumed.stderr
    result = json.loads((tmp_path / "cut-10-rank0.json").read_text())
    assert result["resumed_from"] == runs.step_url(root, "cut", 4)
    assert result["losses"] == {k: straight[k] for k in map(str, range(5, 11))}

    (Path(runs.step_url(root, "cut", 10)) / "ema" / "model.safetensors").unlink()
    resumed = run([*runner, "cut|0|"], env)
    assert "ema/model.safetensors is missing; resuming from the previous checkpoint" in resumed.stderr
    result = json.loads((tmp_path / "cut-12-rank0.json").read_text())
    assert result["resumed_from"] == runs.step_url(root, "cut", 8)  # saved again after step 4
    assert result["losses"] == {k: straight[k] for k in map(str, range(9, 13))}

    # Someone who can write the bucket swaps a state file for a pickle that calls a function,
    # and updates the marker's sha256 to match: it is refused, never unpickled.
    ran = tmp_path / "payload-ran"
    step12 = Path(runs.step_url(root, "cut", 12))
    states = step12 / "state" / "model.safetensors"
    torch.save({"module": Payload(f"touch {ran}")}, states)
    marker = json.loads((step12 / runs.MARKER).read_text())
    marker["sha256"][states.relative_to(step12).as_posix()] = hashlib.sha256(states.read_bytes()).hexdigest()
    (step12 / runs.MARKER).write_text(json.dumps(marker))
    resumed = run([*runner, "cut|0|steps=13"], env)
    assert "state/model.safetensors is not a safetensors file" in resumed.stderr
    assert not ran.exists()
    assert json.loads((tmp_path / "cut-13-rank0.json").read_text())["resumed_from"] == \
        runs.step_url(root, "cut", 8)  # 10 lost its EMA weights above


class Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_enat_micro_batches_share_mask_counts_but_draw_their_own_positions():
    """Every micro-batch of a step (on any rank) builds ENAT's graph from the same counts
    (ZeRO needs one graph), while each masks its own positions: a 2-rank batch holds as many
    masking patterns as a one-process batch of the same size. NAT draws everything per
    micro-batch."""
    from enat.models.config import MaskingConfig
    from enat.models.masking import mask_tokens, previous_step_input
    from enat.trainer.loop import masking_generators

    ids = torch.randint(0, 64, (8, 64))
    masks, remasks = [], []
    for micro_batch in (0, 1):
        counts, positions = masking_generators(0, step=3, micro_batch=micro_batch, enat=True)
        masked, mask = mask_tokens(ids, 64, MaskingConfig(), counts, True, positions)
        remasks.append(previous_step_input(masked, mask, 64, counts, positions) == 64)
        masks.append(mask)
    assert torch.equal(masks[0].sum(1), masks[1].sum(1))  # same counts: the same graph
    assert torch.equal(remasks[0].sum(1), remasks[1].sum(1))
    assert not torch.equal(masks[0], masks[1])  # different positions
    nat = [masking_generators(0, 3, micro_batch, enat=False) for micro_batch in (0, 1)]
    assert all(positions is None for _, positions in nat)
    ratios = [mask_tokens(ids, 64, MaskingConfig(), counts, False)[1].sum(1) for counts, _ in nat]
    assert not torch.equal(*ratios)


def test_lr_warms_up_then_holds_or_decays_to_its_floor():
    """The schedule of both trainers: the generator's LambdaLR and the tokenizer's loop."""
    from enat.trainer.lr_schedule import lr_multiplier

    assert [lr_multiplier(step, 10, 4) for step in range(1, 5)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(7, 10, 4, "constant") == 1.0
    cosine = [lr_multiplier(step, 10, 4, "cosine", min_ratio=0.1) for step in range(4, 11)]
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    assert lr_multiplier(12, 10, 4) == 0.0  # past the last step: the floor


def test_a_ray_run_ended_by_unreachable_storage_ends_with_its_one_line(tmp_path, capsys, monkeypatch):
    """Ray Train wraps what ended its workers; the line a worker's UserError carries is what
    the user sees (exit 2), not Ray's summary."""
    from ray.train import WorkerGroupError

    from enat.cluster import train_cmd
    from enat.pipelines.storage import StorageUnreachable

    write_synthetic_shards(str(tmp_path / "data"), SyntheticSpec(grid=4, codebook_size=64, num_classes=5,
                                                                  samples=32, per_shard=16))
    line = ("storage at http://127.0.0.1:8333 unreachable for 121 s while writing s3://b/runs/r/x: "
            "EndpointConnectionError: …; rerun the same command to resume")

    def workers_failed(*_args, **_kwargs):
        raise WorkerGroupError("rank 1: StorageUnreachable", {0: RuntimeError("gloo: peer gone"),
                                                              1: StorageUnreachable(line)})

    monkeypatch.setattr(train_cmd, "run_on_ray", workers_failed)
    assert main(["train", "--config", str(write_preset(tmp_path, ENAT)), "launch.launcher=ray"]) == 2
    assert capsys.readouterr().err == f"enat: error: {line}\n"
