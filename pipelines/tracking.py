"""MLflow tracking that never stops a job, and loses nothing silently.

The tracking URI comes from MLFLOW_TRACKING_URI (the embedded services set a SQLite store
by default). Params are flattened from the job's config; anything whose key looks like a
credential is dropped, so secrets never reach MLflow. Error messages are shortened and
stripped of any `user:password@` in a URL before they are printed.

Every call only queues: one background thread per run delivers to MLflow in order
(pipelines/outbox.py), so a slow or down server never holds the training loop. While
MLflow is unreachable, metrics (with their original step and timestamp), params, tags,
artifacts and the run's final status stay in a bounded buffer and are retried with backoff;
one warning says when that starts, one line when the backlog is replayed. `close()` and
`finish()` wait a bounded time and say what could not be delivered. Even creating the run
may fail: it is then queued first, and `run_id` stays None until MLflow creates it.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from enat.pipelines.outbox import Entry, Outbox, OutboxOptions, describe, to_stderr

SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key", re.IGNORECASE)
URL_USERINFO = re.compile(r"(\w+://)[^/\s@]+@")
# How long creating a tracker waits for the first attempt to create the run: a down server
# fails at once (connection refused), a new SQLite store takes ~5 s to set up, a hung server
# is left behind after this (the run is then created later, in the background).
START_WAIT = 30.0
REQUEST_TIMEOUT = "30"  # seconds of one MLflow HTTP request, unless the user set another
BATCH_METRICS = 1000  # MLflow's limit per log_batch request


class TrackingUndelivered(RuntimeError):
    """What was logged did not reach MLflow within the time allowed."""


def error_line(err: BaseException) -> str:
    """One short line for a log, without credentials a URL may carry."""
    text = URL_USERINFO.sub(r"\1***@", str(err).splitlines()[0][:200] if str(err) else "")
    return f"{err.__class__.__name__}: {text}"


def refused(err: Exception) -> bool:
    """MLflow answered and rejected the request (a bad value, a missing run): retrying would
    not help. Anything else (no connection, a timeout, a server error) is an outage."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values; credential-like keys are left out."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]  # MLflow caps param values
    return flat


class Tracker:
    """One MLflow run, written through an outbox (see the module docstring).

    `wait`: the seconds close() and finish() wait for an unreachable MLflow by default.
    A disabled tracker (`enabled=False`) ignores every call."""

    def __init__(self, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None,
                 enabled: bool = True, wait: float = 60.0, buffer: OutboxOptions | None = None):
        self.client = None
        self.run_id = run_id
        self.wait = wait
        self.gave_up: str | None = None  # why nothing more is tracked (a refused run creation)
        self._attempted = threading.Event()  # the run's creation was tried once
        self.outbox = Outbox("MLflow", self._deliver, refused, buffer, reason=error_line,
                             reachable=self._reachable)
        if not enabled:
            return
        # The outbox is the retry layer: MLflow's own HTTP retries (7 with backoff, minutes
        # inside one request) would hide an outage from it. A value the user set wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT)
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))
        except Exception as err:  # noqa: BLE001 - a bad tracking URI must not stop the job
            self._give_up(f"no MLflow client ({error_line(err)})")
            return
        if run_id is None:
            all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
            all_tags["mlflow.runName"] = run_name
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            self.outbox.put(Entry("run", (experiment, all_tags)))
            self._attempted.wait(START_WAIT)

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        to_stderr(f"warning: MLflow tracking off for this run: {reason}")

    @property
    def active(self) -> bool:
        """Tracking is on (what is logged reaches MLflow now or after an outage)."""
        return self.client is not None and self.gave_up is None

    # -- delivery (the outbox's thread) ----------------------------------------------------

    def _deliver(self, head: Sequence[Entry]) -> int:
        first = head[0]
        if self.gave_up is not None:
            return len(head)  # said once when it happened
        if first.kind == "run":
            self._create_run(*first.payload)
            return 1
        if first.kind == "metrics":  # consecutive metric batches go in one request
            metrics, taken = list(first.payload), 1
            while (taken < len(head) and head[taken].kind == "metrics"
                   and len(metrics) + len(head[taken].payload) <= BATCH_METRICS):
                metrics += head[taken].payload
                taken += 1
            self.client.log_batch(self.run_id, metrics=metrics)
            return taken
        if first.kind in ("params", "tags"):
            self.client.log_batch(self.run_id, **{first.kind: first.payload})
        elif first.kind == "artifact":
            name, data, artifact_path = first.payload
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / name).write_bytes(data)
                self.client.log_artifact(self.run_id, str(Path(tmp) / name), artifact_path)
        elif first.kind == "status":
            self.client.set_terminated(self.run_id, first.payload)
        return 1

    def _reachable(self) -> bool:
        try:
            self.client.search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - any failure: not reachable
            return False
        return True

    def _create_run(self, experiment: str, tags: dict[str, str]) -> None:
        try:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, tags=tags).info.run_id
        except Exception as err:
            if refused(err):
                self._give_up(f"MLflow refused to create the run ({error_line(err)})")
                return
            raise
        finally:
            self._attempted.set()

    def last_step(self, key: str) -> int:
        """The highest step MLflow holds a `key` metric for (0: none, or MLflow unreachable).
        A run restarted from its last checkpoint recomputes the steps after it; the loop
        logs only those MLflow does not have, so each step is logged once."""
        if not self.active or self.run_id is None:
            return 0
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception:  # noqa: BLE001 - unreachable: log everything rather than lose steps
            return 0

    # -- logging: queued, never blocking ---------------------------------------------------

    def _put(self, entry: Entry) -> None:
        if self.active:
            self.outbox.put(entry)

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(config).items()]
        for start in range(0, len(params), 90):  # MLflow takes at most 100 per batch
            chunk = params[start : start + 90]
            self._put(Entry("params", chunk, len(chunk)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the time it was logged, not the time it is delivered
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            self._put(Entry("metrics", batch, len(batch), droppable=True))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if batch:
            self._put(Entry("tags", batch, len(batch)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file as an artifact; its bytes are read now (the file may be gone at delivery)."""
        self.log_bytes(Path(path).read_bytes(), Path(path).name, artifact_path)

    def log_bytes(self, data: bytes, name: str, artifact_path: str | None = None) -> None:
        """An in-memory file as the artifact `[artifact_path/]name`."""
        self._put(Entry("artifact", (name, data, artifact_path), 1, len(data), droppable=True))

    def log_text(self, text: str, name: str) -> None:
        self.log_bytes(text.encode(), name)

    # -- waiting for delivery --------------------------------------------------------------

    def _all_delivered(self) -> bool:
        """Every metric, param, tag and status so far reached MLflow. Artifacts (sample grids,
        plots) count for less: one that is lost is named in a warning."""
        return self.gave_up is None and not self.outbox.stats.lost_kinds - {"artifact"}

    def close(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (default: `wait`) for what is buffered to reach
        MLflow, then stop delivering; says what did not. True when nothing is left and no
        metric, param, tag or status was dropped or refused (see _all_delivered). The run
        keeps its status (a run continued later stays RUNNING)."""
        if not self.active:
            return self.gave_up is None
        timeout = self.wait if timeout is None else timeout
        left = self.outbox.close(timeout)
        if left:
            steps = sorted(m.step for entry in left if entry.kind == "metrics" for m in entry.payload)
            span = f" (metrics of steps {steps[0]}-{steps[-1]})" if steps else ""
            to_stderr(f"warning: MLflow did not take {describe(left)}{span} within {timeout:g} s: not "
                      f"delivered")
        if self.outbox.stats.dropped:
            to_stderr(f"warning: MLflow: {self.outbox.stats.dropped} buffered values (the oldest metrics "
                      f"or artifacts) were dropped to stay within the buffer's bound")
        return not left and self._all_delivered()

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Set the run's final status (after everything logged before it) and close()."""
        self._put(Entry("status", status))
        return self.close(timeout)
