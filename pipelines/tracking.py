"""MLflow tracking that never stops a job: an unreachable server degrades to one warning.

The tracking URI comes from MLFLOW_TRACKING_URI (the embedded services set a SQLite store
by default). Params are flattened from the job's config; anything whose key looks like a
credential is dropped, so secrets never reach MLflow.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key", re.IGNORECASE)


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
    """One MLflow run. Every call is a no-op after the first failure (with a warning)."""

    def __init__(self, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None,
                 enabled: bool = True):
        self.client = None
        self.run_id: str | None = None
        if not enabled:
            return
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))
            if run_id is None:
                experiment_id = self._experiment_id(experiment)
                all_tags = dict(tags or {})
                all_tags["mlflow.runName"] = run_name
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run_id = self.client.create_run(experiment_id, tags=all_tags).info.run_id
            self.run_id = run_id
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop the job
            self._disable(err)

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _disable(self, err: Exception) -> None:
        print(f"warning: MLflow tracking disabled ({err.__class__.__name__}: "
              f"{str(err).splitlines()[0][:200] if str(err) else ''})", file=sys.stderr)
        self.client = None

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            getattr(self.client, method)(self.run_id, *args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(config).items()]
        for start in range(0, len(params), 90):  # MLflow takes at most 100 per batch
            self._call("log_batch", params=params[start : start + 90])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log_batch", metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._call("set_tag", key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path)

    def log_bytes(self, data: bytes, name: str, artifact_path: str | None = None) -> None:
        """An in-memory file as the artifact `[artifact_path/]name`."""
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / name
            file.write_bytes(data)
            self.log_artifact(file, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.log_bytes(text.encode(), name)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", status)
