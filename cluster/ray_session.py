"""Connecting to Ray, the one way every enat command does it.

RAY_ADDRESS names a cluster (`ray start --head`, `ray up`, KubeRay, or the address `enat
submit` gives a job); without it a private local Ray starts, loopback-only, sized by
`num_cpus`. Workers of a local Ray inherit this process's environment; on a cluster only
the non-secret endpoint variables are forwarded: credentials come from the cluster's own
environment (instance profile, Kubernetes Secret), never from this process.
"""

from __future__ import annotations

import os
import sys

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def start_ray(num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray with `num_cpus` (None: the machine's);
    True if this call connected (the caller then shuts Ray down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a submitted job (`enat submit`) the job's runtime env already carries these
        # to every worker, and Ray refuses a second env that names the same variables.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        env = {} if in_job else {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=not quiet)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only cluster
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
    if not quiet:
        print(f"ray: {'cluster ' + address if address else 'local'}, session "
              f"{ray._private.worker.global_worker.node.get_session_dir_path()}, "
              f"job {ray.get_runtime_context().get_job_id()}", file=sys.stderr, flush=True)
    return True


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
