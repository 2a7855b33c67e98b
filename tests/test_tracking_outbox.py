"""The tracking outbox (pipelines/outbox.py) against a fake receiver, and the Tracker on a
SQLite store behind a client that fails while "down": order, original steps and
timestamps, the bound, backoff, refusals, and the one-line reports."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from enat.pipelines.outbox import Backoff, Entry, Outbox, OutboxOptions

FAST = OutboxOptions(backoff_initial=0.02, backoff_max=0.1)


class Refused(Exception):
    pass


class Receiver:
    """Takes entries in order while up; fails every call while down (counting attempts)."""

    def __init__(self, down: bool = False):
        self.down, self.got, self.attempts = down, [], 0

    def deliver(self, head):
        self.attempts += 1
        if self.down:
            raise ConnectionError("connection refused")
        if head[0].kind == "bad":
            raise Refused("bad value")
        self.got.append(head[0].payload)
        return 1


def outbox(receiver: Receiver, options: OutboxOptions = FAST) -> tuple[Outbox, list[str]]:
    lines: list[str] = []
    box = Outbox("fake", receiver.deliver, lambda err: isinstance(err, Refused), options, say=lines.append)
    return box, lines


def test_an_outage_is_buffered_and_replayed_in_order_with_one_line_each_way():
    receiver = Receiver(down=True)
    box, lines = outbox(receiver)
    for i in range(50):
        box.put(Entry("metrics", i, droppable=True))
    time.sleep(0.3)
    assert receiver.got == [] and receiver.attempts >= 2
    assert not box.wait(0.1)
    receiver.down = False
    assert box.wait(5)
    assert receiver.got == list(range(50))
    assert len(lines) == 2
    assert lines[0].startswith("warning: fake unreachable (connection refused); buffering")
    assert lines[1].startswith("fake reachable again after") and "replayed 50 buffered values" in lines[1]
    assert box.stats.replayed == 50 and box.stats.dropped == 0 and box.stats.outages == 1
    box.put(Entry("metrics", 50))  # healthy again: delivered without a word
    assert box.wait(5) and receiver.got[-1] == 50 and len(lines) == 2


def test_put_never_waits_for_a_hung_receiver():
    release = threading.Event()
    box = Outbox("fake", lambda head: release.wait() and 1, lambda err: False, FAST)
    started = time.monotonic()
    for i in range(5000):
        box.put(Entry("metrics", i, droppable=True))
    assert time.monotonic() - started < 1.0
    assert not box.wait(0.2)  # bounded wait, then an answer
    release.set()
    assert box.wait(10)


def test_backoff_doubles_to_its_cap_and_starts_over():
    backoff = Backoff(1.0, 10.0)
    assert [backoff.next() for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    backoff.reset()
    assert backoff.next() == 1
    # A receiver down for 1 s is tried a handful of times, not in a busy loop.
    receiver = Receiver(down=True)
    box, _ = outbox(receiver, OutboxOptions(backoff_initial=0.05, backoff_max=0.2))
    box.put(Entry("metrics", 0))
    time.sleep(1.0)
    assert 3 <= receiver.attempts <= 15
    receiver.down = False
    assert box.wait(2)  # noticed within the cap


def test_the_bound_drops_the_oldest_metrics_and_keeps_the_rest():
    receiver = Receiver(down=True)
    box, lines = outbox(receiver, OutboxOptions(max_values=10, backoff_initial=0.02, backoff_max=0.05))
    box.put(Entry("params", "p", values=2))
    for i in range(5):
        box.put(Entry("metrics", i, values=3, droppable=True))
    box.put(Entry("status", "FINISHED"))
    kept = [entry.payload for entry in box.pending()]
    # 2 + 3 + 3 + 1 values fit in 10; the held entry at the head may not be dropped.
    assert kept[0] == "p" and kept[-1] == "FINISHED" and kept[1:-1] == [3, 4]
    assert box.stats.dropped == 9
    time.sleep(0.1)  # the outage is seen
    receiver.down = False
    assert box.wait(5)
    assert receiver.got == kept
    assert "9 dropped to stay within the bound" in lines[-1]


def test_bytes_are_bounded_too_and_an_oversized_artifact_is_dropped_not_held():
    receiver = Receiver(down=True)
    box, _ = outbox(receiver, OutboxOptions(max_bytes=100, backoff_initial=0.02, backoff_max=0.05))
    box.put(Entry("metrics", "m", droppable=True))
    box.put(Entry("artifact", "a1", nbytes=60, droppable=True))
    box.put(Entry("artifact", "a2", nbytes=60, droppable=True))  # a1 makes room, the metric stays
    box.put(Entry("artifact", "huge", nbytes=1000, droppable=True))
    assert [entry.payload for entry in box.pending()] == ["m", "a2"]
    assert box.stats.dropped == 2


def test_a_refused_entry_is_dropped_with_a_warning_and_the_rest_goes_on():
    receiver = Receiver()
    box, lines = outbox(receiver)
    box.put(Entry("metrics", 1))
    box.put(Entry("bad", "x"))
    box.put(Entry("metrics", 2))
    assert box.wait(5)
    assert receiver.got == [1, 2] and box.stats.refused == 1
    assert lines == ["warning: fake refused 1 bad, dropped: bad value"]


@pytest.mark.parametrize("answers", [True, False])
def test_an_entry_that_keeps_failing_while_the_receiver_answers_is_dropped(answers):
    """A server error on one request (an artifact store that fails) must not hold what
    follows forever; while the receiver does not answer at all, it is an outage: kept."""
    receiver = Receiver()

    def deliver(head):
        if head[0].kind == "artifact":
            raise ConnectionError("500 from the artifact store")
        return receiver.deliver(head)

    lines: list[str] = []
    box = Outbox("fake", deliver, lambda err: False, FAST, say=lines.append, reachable=lambda: answers)
    box.put(Entry("metrics", 1))
    box.put(Entry("artifact", "grid", nbytes=10, droppable=True))
    box.put(Entry("metrics", 2))
    if answers:
        assert box.wait(5) and receiver.got == [1, 2]
        assert box.stats.refused == 1 and box.stats.lost_kinds == {"artifact"}
        assert "warning: fake answers but failed 1 artifact 3 times in a row, dropped: 500 from" in lines[1]
    else:
        assert not box.wait(0.5) and receiver.got == [1]
        assert [entry.payload for entry in box.pending()] == ["grid", 2]


def test_close_gives_up_after_its_timeout_and_returns_what_is_left():
    receiver = Receiver(down=True)
    box, _ = outbox(receiver)
    box.put(Entry("metrics", 1, droppable=True))
    box.put(Entry("status", "FINISHED"))
    started = time.monotonic()
    left = box.close(0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert [entry.payload for entry in left] == [1, "FINISHED"]
    receiver.down = False
    time.sleep(0.3)
    assert receiver.got == []  # closed: nothing is sent any more


def test_a_process_exiting_with_a_backlog_says_so():
    code = ("from enat.pipelines.outbox import Entry, Outbox\n"
            "def down(head): raise ConnectionError('refused')\n"
            "box = Outbox('fake', down, lambda err: False)\n"
            "box.put(Entry('metrics', 1, values=3))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "warning: fake did not get 3 metrics: the process exited first" in result.stderr


# -- the Tracker on a real SQLite store behind a client that can be "down" -----------------


@pytest.fixture
def flaky_mlflow(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI on a SQLite store; every MlflowClient the tracker makes fails
    all calls while `state["down"]` is set, as an unreachable server does."""
    import mlflow.tracking
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    state = {"down": False}
    real = mlflow.tracking.MlflowClient

    class FlakyClient:
        def __init__(self, tracking_uri=None):
            self.client = real(tracking_uri)

        def __getattr__(self, name):
            method = getattr(self.client, name)

            def call(*args, **kwargs):
                if state["down"]:
                    raise MlflowException("API request to http://user:pw@mlflow/api failed: refused")
                return method(*args, **kwargs)
            return call

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", FlakyClient)
    state["client"] = real(uri)
    return state


def test_tracker_creates_the_run_after_an_outage_at_start_and_replays_everything(flaky_mlflow, capsys):
    from enat.pipelines.tracking import Tracker

    flaky_mlflow["down"] = True
    tracker = Tracker("tests", "late", tags={"enat.run": "late"}, buffer=FAST)
    assert tracker.run_id is None and tracker.active
    tracker.log_params({"lr": 0.1, "aws": {"secret_access_key": "S3CRET"}})
    stamps = []
    for step in range(1, 31):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        stamps.append(int(time.time() * 1000))
        time.sleep(0.002)
    tracker.set_tags({"checkpoint.latest": "s3://b/step-30"})
    assert tracker.run_id is None
    flaky_mlflow["down"] = False
    assert tracker.finish(timeout=20)
    client = flaky_mlflow["client"]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "late"
    assert run.data.params == {"lr": "0.1"} and run.data.tags["checkpoint.latest"] == "s3://b/step-30"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 31)]
    # each value keeps the time it was logged, not the time it was delivered
    assert all(m.timestamp <= stamp for m, stamp in zip(history, stamps, strict=True))
    err = capsys.readouterr().err
    assert err.count("warning: MLflow unreachable") == 1 and err.count("MLflow reachable again") == 1
    assert "replayed 64 buffered values" in err  # the run, 1 param, 60 metrics, 1 tag, the status
    assert "pw@" not in err and "***@" in err and "S3CRET" not in err


def test_tracker_finish_is_bounded_and_names_what_was_not_delivered(flaky_mlflow, capsys):
    from enat.pipelines.tracking import Tracker

    tracker = Tracker("tests", "cut", buffer=FAST)
    assert tracker.run_id
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.outbox.wait(10)
    flaky_mlflow["down"] = True
    for step in (2, 3, 4):
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step)
    started = time.monotonic()
    assert not tracker.finish(timeout=0.5)
    assert time.monotonic() - started < 3
    err = capsys.readouterr().err
    assert "MLflow did not take 6 metrics, 1 status (metrics of steps 2-4) within 0.5 s" in err
    assert flaky_mlflow["client"].get_run(tracker.run_id).info.status == "RUNNING"
