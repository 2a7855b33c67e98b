"""Training through an outage of the object store, on a SeaweedFS of this module's own that the
tests stop and start again on the same ports with the same data: tiny ENAT, one process, data
and checkpoints on S3, fp32. A 15 s outage is waited out and the losses equal an uninterrupted
run's; a token stream whose reads all start during an outage hands out the same batches; an
outage longer than the retry window ends the run with one line naming the endpoint, and
rerunning the same command resumes from the last published checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_train_loop import ENAT, RUNNER, environment, write_preset

from enat.cluster.services import S3Endpoint, SeaweedFS
from enat.pipelines import runs, storage
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

STEPS, EVERY = 40, 4
OUTAGE_SECONDS = 15

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Setup:
    server: SeaweedFS
    endpoint: S3Endpoint
    tmp_path: Path
    preset: Path
    root: str
    env: dict[str, str]  # for the training processes
    losses: dict[str, float]  # the uninterrupted run's, by step


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """The module's SeaweedFS, token shards and preset on it, and the uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("outage")
    server = SeaweedFS(tmp_path / "seaweedfs")
    endpoint = server.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in endpoint.env().items():
                patch.setenv(key, value)
            bucket = f"s3://outage-{uuid.uuid4().hex[:8]}"
            storage.ensure_bucket(bucket)
            # Small shards: the reader fetches one every step or two.
            write_synthetic_shards(f"{bucket}/data", SyntheticSpec(grid=4, codebook_size=64, num_classes=5,
                                                                   samples=96, per_shard=8))
        root = f"{bucket}/root"
        data = {"url": f"{bucket}/data", "readers": 1, "shuffle_window": 4, "prefetch": 4}
        preset = write_preset(tmp_path, ENAT, root=root, steps=STEPS, checkpoint_every=EVERY, tracking=False,
                              data=data)
        (tmp_path / "runner.py").write_text(RUNNER)
        env = environment(tmp_path, **endpoint.env())
        with train(tmp_path, preset, env, "straight") as straight:
            straight.finish()
        losses = json.loads((tmp_path / f"straight-{STEPS}-rank0.json").read_text())["losses"]
        yield Setup(server, endpoint, tmp_path, preset, root, env, losses)
    finally:
        server.stop()


class Process:
    """A command in a process of its own, its output in files (a pipe nobody reads would
    block it)."""

    def __init__(self, command: list[str], env: dict[str, str], logs: Path):
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *_) -> None:
        if self.process.poll() is None:  # a failed test leaves nothing running
            self.process.kill()
            self.process.wait()

    def finish(self, code: int = 0, timeout: float = 600) -> tuple[str, str]:
        self.process.wait(timeout=timeout)
        out, err = self.out.read_text(), self.err.read_text()
        assert self.process.returncode == code, out[-3000:] + err[-6000:]
        return out, err


def train(setup_path: Path, preset: Path, env: dict[str, str], run: str, overrides: str = "") -> Process:
    """The training loop (RUNNER of test_train_loop), which writes `<run>-<last step>-rank0.json`
    with its losses."""
    command = [sys.executable, str(setup_path / "runner.py"), str(preset), str(setup_path),
               f"{run}|0|{overrides}"]
    return Process(command, env, setup_path / run)


def wait_for_checkpoint(setup: Setup, run: str, step: int, running: Process) -> None:
    """Until checkpoint `step` of `run` is published (its marker exists)."""
    marker = storage.join(runs.step_url(setup.root, run, step), runs.MARKER)
    deadline = time.monotonic() + 300
    while not storage.exists(marker):
        assert running.process.poll() is None, running.err.read_text()[-6000:]
        assert time.monotonic() < deadline, f"no checkpoint at step {step} within 300 s"
        time.sleep(0.2)


@pytest.fixture
def s3_env_of(setup, monkeypatch) -> Setup:
    for key, value in setup.endpoint.env().items():
        monkeypatch.setenv(key, value)
    return setup


def test_a_15_s_outage_during_training_is_waited_out_and_changes_no_loss(s3_env_of):
    setup = s3_env_of
    with train(setup.tmp_path, setup.preset, setup.env, "outage") as running:
        wait_for_checkpoint(setup, "outage", EVERY, running)
        started = time.monotonic()
        with setup.server.stopped():  # started again on the same ports when the block ends
            time.sleep(OUTAGE_SECONDS)
        down = time.monotonic() - started
        _, err = running.finish()

    losses = json.loads((setup.tmp_path / f"outage-{STEPS}-rank0.json").read_text())["losses"]
    assert losses == setup.losses  # every step, fp32: the same data in the same order
    # Whether the outage stops a shard read or the next checkpoint's save depends on where
    # the run is when the server goes down; either waits it out.
    waits = re.findall(r"reachable again after ([\d.]+) s \((\d+) retries\) while (\w+ s3://\S+)", err)
    print(f"outage {down:.1f} s; calls that waited it out (s, retries, what): {waits}")
    assert max((float(seconds) for seconds, _, _ in waits), default=0) >= OUTAGE_SECONDS - 5, err[-3000:]
    assert [c.step for c in runs.scan(setup.root, "outage")[0]] == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]


def test_the_token_stream_started_during_an_outage_gives_the_same_batches(s3_env_of):
    """Every read of the stream's readers starts while the store is down: they wait, then
    hand out exactly the batches of a stream that never met an outage."""
    from test_train_data import MODEL, keys_of

    from enat.trainer.data import DataConfig, TokenStream, open_dataset

    setup = s3_env_of
    config = DataConfig(url=setup.root.replace("/root", "/data"), readers=2, shuffle_window=4, prefetch=4)
    dataset = open_dataset(config, MODEL)
    calm = TokenStream(dataset, config, batch_size=6, seed=5, rank=0, world_size=1)
    expected = keys_of(calm, 20)  # more than an epoch
    calm.close()
    with setup.server.stopped():
        stream = TokenStream(dataset, config, batch_size=6, seed=5, rank=0, world_size=1)
        time.sleep(OUTAGE_SECONDS)  # longer than botocore's and s3fs's own retries last
    assert keys_of(stream, 20) == expected
    stream.close()
    assert stream.stats().missing_shards == 0


def test_an_outage_past_the_window_ends_with_one_line_and_a_rerun_resumes(s3_env_of):
    setup = s3_env_of
    command = [sys.executable, "-m", "enat.cluster.cli", "train", "--config", str(setup.preset), "run=long",
               "launch.launcher=process"]
    env = {**setup.env, "ENAT_STORAGE_RETRY_SECONDS": "3"}
    with Process(command, env, setup.tmp_path / "long") as running:
        wait_for_checkpoint(setup, "long", EVERY, running)
        with setup.server.stopped():
            _, err = running.finish(code=2, timeout=300)
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(f"enat: error: storage at {re.escape(setup.endpoint.url)} unreachable for \\d+ s "
                        f"while [a-z]+ s3://outage-[0-9a-f]+[^ ]*: [^\n]+; "
                        f"rerun the same command to resume", last), last
    assert err.count("enat: error:") == 1 and "Traceback" not in err, err[-6000:]
    published = runs.latest(setup.root, "long").step
    assert EVERY <= published < STEPS

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-6000:]
    assert f"resumed from {runs.step_url(setup.root, 'long', published)} (step {published}," in rerun.stdout
    assert f"run long finished at step {STEPS}" in rerun.stdout
    # Each checkpoint records the loss of its step: after the resume they equal the
    # uninterrupted run's.
    for saved in runs.scan(setup.root, "long")[0]:
        assert saved.meta["metrics"]["loss"] == setup.losses[str(saved.step)], saved.step
