"""Evaluate each new checkpoint of a training run as a Ray task: what `enat eval watch <run>`
and `enat train ... eval.watch=true` run.

The watcher polls the run's checkpoints, hands each complete one without an evaluation
record to a Ray task (`num_cpus`, and `num_gpus` of a GPU when the cluster has GPUs, so
evaluation shares the nodes with training), and logs FID against step into the training
run's MLflow run. What has been evaluated is read from the run's `evals/` records
(evaluation/watch.py), so a restarted watcher picks up where the last one stopped.

With `follow=true` (the default) it returns once the run's final step is evaluated (or
after `idle_timeout` seconds without a new checkpoint); `follow=false` evaluates what is
there and returns. `enat train ... eval.watch=true eval.reference=...` runs the same
watcher beside the training workers and drains it when training ends.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from enat.cluster.jobs import TrainEvalConfig
from enat.evaluation.config import WatchConfig
from enat.evaluation.watch import checkpoints_of, evaluate_step, read_records
from enat.models.typed_config import narrow


def _say(message: str) -> None:
    print(f"eval watch: {message}", file=sys.stderr, flush=True)


def describe_record(record: dict[str, Any]) -> str:
    from enat.evaluation.evaluate import metrics_line

    return (f"{metrics_line(record)}  [extractor {record['extractor_id']}, {record['num_samples']} samples, "
            f"{record['images_per_s']:.3g} images/s]")


def watch(config: WatchConfig, stop: threading.Event | None = None) -> dict[int, dict[str, Any]]:
    """Evaluate the run's checkpoints until done (see the module docstring). With `stop`,
    the caller decides when the run is over (a resumed run may go past the step its
    checkpoints planned): setting it means no more checkpoints will come, evaluate the
    rest and return.
    Returns the records of the evaluations this call ran. Ray must be connected."""
    import ray

    from enat.cluster.ray_session import cluster_has_gpus

    options: dict[str, Any] = {"num_cpus": config.num_cpus, "max_retries": 1}
    if cluster_has_gpus():
        options["num_gpus"] = config.num_gpus
    task = ray.remote(evaluate_step).options(**options)
    in_flight: dict[Any, int] = {}  # Ray object ref -> step
    evaluated: dict[int, dict[str, Any]] = {}
    failed: set[int] = set()  # failed in this call (e.g. pruned first): left for a rerun
    seen: set[int] = set()
    last_new = time.monotonic()
    while True:
        draining = not config.follow or (stop is not None and stop.is_set())
        records = read_records(config.run)
        checkpoints = checkpoints_of(config.run)
        for step, url, _ in checkpoints:
            if step not in seen:
                seen.add(step)
                last_new = time.monotonic()
            busy = step in records or step in failed or step in in_flight.values()
            if not busy and len(in_flight) < config.max_in_flight:
                in_flight[task.remote(config, step, url)] = step
                _say(f"step {step}: evaluating {url}")
        if in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=config.poll_seconds)
            for ref in done:
                step = in_flight.pop(ref)
                try:
                    evaluated[step] = ray.get(ref)
                    _say(f"step {step}: {describe_record(evaluated[step])}")
                except Exception as err:  # noqa: BLE001 - one bad checkpoint must not end the watch
                    failed.add(step)
                    reason = str(err).splitlines()[-1][:300]
                    _say(f"step {step}: evaluation failed, left for a rerun ({reason})")
            continue
        pending = [step for step, _, _ in checkpoints if step not in records and step not in failed]
        if draining and not pending:
            return evaluated
        if stop is None:  # on its own, the watcher decides when the run is over
            final_done = bool(checkpoints) and checkpoints[-1][0] == checkpoints[-1][2] and not pending
            idle = config.idle_timeout and time.monotonic() - last_new > config.idle_timeout
            if final_done or idle:
                return evaluated
        if stop is not None:
            stop.wait(config.poll_seconds)
        else:
            time.sleep(config.poll_seconds)


class BackgroundWatch:
    """The watcher in a thread of the training driver: started before training, drained after."""

    def __init__(self, config: TrainEvalConfig, run_url: str):
        self.config = narrow(config, WatchConfig, run=run_url)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="eval-watch", daemon=True)

    def _run(self) -> None:
        try:
            watch(self.config, self.stop)
        except BaseException as err:  # noqa: BLE001 - reported by finish(), training goes on
            self.error = err

    def start(self) -> BackgroundWatch:
        self.thread.start()
        return self

    def finish(self) -> None:
        """Evaluate what is left, then return; a watcher error is reported, not raised:
        the training result stands and `enat eval watch` can finish the job."""
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            _say(f"stopped with an error: {self.error}; "
                 f"rerun `enat eval watch {self.config.run} ...` to finish")
