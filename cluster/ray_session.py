"""Connecting to Ray, the one way every enat command does it.

RAY_ADDRESS names a cluster (`ray start --head`, `ray up`, KubeRay, or the address `enat
submit` gives a job); without it a private local Ray starts, listening on loopback only,
sized by `num_cpus`. Commands hold Ray for a block, `with ray_session(...):`. Workers of a local
Ray inherit this process's environment; on a cluster only the non-secret endpoint
variables are forwarded: credentials come from the cluster's own environment (instance
profile, Kubernetes Secret), never from this process.

Ray Tune copies the driver's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into every trial's
runtime env, and Ray's runtime-env agent writes that env to the session logs. So before
Ray starts, keys found in the environment move to a private credentials file
(`hide_credential_keys`): the environment then holds its location only, and botocore
reads it in each process of this machine.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 "ENAT_STORAGE_RETRY_SECONDS")

# Set in every Ray worker's environment. Ray Train patches print() in its workers to log
# each line, and also prints it when sys.stdout is not the original, which Ray's own worker
# setup always makes so: every training log line reached the console twice.
WORKER_SETTINGS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def start_ray(num_cpus: int | None = None, quiet: bool = False,
              resources: dict[str, float] | None = None) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray with `num_cpus` (None: the machine's) and
    custom `resources` (a cluster's nodes declare their own); True if this call connected
    (the caller then shuts Ray down)."""
    keep_local_ray_on_loopback()  # before Ray's first import in this process, where it can
    import ray

    hide_credential_keys()  # also for a Ray started by the caller: Tune copies os.environ
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a submitted job (`enat submit`) the job's runtime env already carries these
        # to every worker, and Ray refuses a second env that names the same variables.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        env = {} if in_job else {**WORKER_SETTINGS,
                                 **{key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=not quiet)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only cluster
        for key, value in WORKER_SETTINGS.items():  # the local Ray's workers inherit them
            os.environ.setdefault(key, value)
        setup = f"{__name__}.{quiet_placement_group_cleaner.__name__}"
        ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=False,
                 log_to_driver=not quiet, runtime_env={"worker_process_setup_hook": setup})
    if not quiet:
        print(f"ray: {'cluster ' + address if address else 'local'}, session "
              f"{ray._private.worker.global_worker.node.get_session_dir_path()}, "
              f"job {ray.get_runtime_context().get_job_id()}", file=sys.stderr, flush=True)
    return True


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Setup of every worker of a local Ray: silence the warnings of Ray Train's placement
    group cleaner. Every second it asks Ray's State API whether the training's controller
    still lives; the State API is served by the dashboard, which a local Ray does not run,
    so each ask fails with a warning (500 lines in a demo). Nothing is lost: the groups it
    would remove after a crash end with the local Ray, which ends with the command."""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def keep_local_ray_on_loopback() -> None:
    """Make a local Ray started by this process listen on 127.0.0.1 only.

    Ray gives a node its routable address and its servers listen on every interface. With
    this switch (Ray's own, meant for single-machine Ray on macOS and Windows) the node's
    address is 127.0.0.1 and every Ray process listens on loopback; the processes Ray
    starts inherit it, so they agree on that address. Ray reads it when first imported, so
    `enat` sets it at start-up (cluster/cli.py). Nothing changes when RAY_ADDRESS names a
    cluster."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, quiet: bool = False,
                resources: dict[str, float] | None = None) -> Iterator[None]:
    """Ray connected for the block (arguments as for start_ray). On leaving it, Ray is shut
    down only if this call connected it: a Ray the caller had initialised (a test, a
    notebook) stays up."""
    import ray

    started = start_ray(num_cpus, quiet, resources)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def hide_credential_keys() -> str | None:
    """Move AWS keys from this process's environment into a credentials file of its own
    (mode 0600, removed at exit) named by AWS_SHARED_CREDENTIALS_FILE/AWS_PROFILE.
    Returns the file, or None when the environment held no keys."""
    if not os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("AWS_SECRET_ACCESS_KEY"):
        for name in KEY_VARIABLES:  # half a key pair is no credential: keep none of it
            os.environ.pop(name, None)
        return None
    lines = ["[enat-env]", f"aws_access_key_id = {os.environ.pop('AWS_ACCESS_KEY_ID')}",
             f"aws_secret_access_key = {os.environ.pop('AWS_SECRET_ACCESS_KEY')}"]
    if os.environ.get("AWS_SESSION_TOKEN"):
        lines.append(f"aws_session_token = {os.environ.pop('AWS_SESSION_TOKEN')}")
    descriptor, path = tempfile.mkstemp(prefix="enat-aws-credentials-")  # created 0600
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    os.environ.update(AWS_SHARED_CREDENTIALS_FILE=path, AWS_PROFILE="enat-env")
    return path


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
