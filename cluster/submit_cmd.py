"""`enat submit` and `enat jobs`: run any enat command on a Ray cluster via the Job API.

The job's environment carries the submitter's storage and MLflow *locations*
(AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI, ...). Credentials are expected to be on the
cluster already (its own environment, instance profile or Kubernetes secrets).
`--forward-credentials` forwards where the submitter's credentials are
(AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), for a cluster whose nodes can read that file
(this machine, a shared mount). Key values never travel: Ray logs a job's runtime env,
and Tune copies it to every trial. Secrets never go on a command line and are never printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enat.cluster.command import Command
from enat.cluster.ray_session import WORKER_SETTINGS
from enat.models.errors import UserError
from enat.models.typed_config import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
FORWARDED_SETTINGS = ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
                      "AWS_DEFAULT_REGION", "ENAT_STATE_DIR", "RAY_AUTH_MODE", "ENAT_STORAGE_RETRY_SECONDS")
CREDENTIAL_LOCATIONS = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")
REPO_ROOT = Path(__file__).resolve().parents[1]
# The checkout's folders that make the `enat` package (pyproject.toml's package-dir).
PACKAGE_FOLDERS = ("models", "trainer", "pipelines", "cluster", "evaluation", "configs")


class ClusterRefused(UserError, PermissionError):
    """The cluster's Job API wants Ray's token and did not get the right one."""


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def _token_refusals_as_user_errors(action: Callable[..., int]) -> Callable[..., int]:
    """Ray's AuthenticationError (HTTP 401/403 from a cluster with token authentication) as
    one line that says how to present the token, instead of Ray's traceback."""
    @functools.wraps(action)
    def guarded(*args: Any, **kwargs: Any) -> int:
        from ray.exceptions import AuthenticationError

        try:
            return action(*args, **kwargs)
        except AuthenticationError as err:
            raise ClusterRefused(
                "the Ray cluster refused the request for lack of its token: set RAY_AUTH_MODE=token "
                "and RAY_AUTH_TOKEN_PATH to a 0600 file holding the token (or put it in "
                "~/.ray/auth_token); see the README, 'Who may reach a cluster'") from err
    return guarded


def job_environment(forward_credentials: bool) -> dict[str, str]:
    if forward_credentials and not os.environ.get("AWS_SHARED_CREDENTIALS_FILE"):
        raise ConfigError("--forward-credentials forwards a credentials file's location, never "
                          "keys (Ray logs a job's env): set AWS_SHARED_CREDENTIALS_FILE to a file the "
                          "cluster's nodes can read, or give the cluster its own credentials")
    names = FORWARDED_SETTINGS + (CREDENTIAL_LOCATIONS if forward_credentials else ())
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def checkout_package(into: Path) -> Path:
    """This checkout laid out as the installed `enat` package (enat/models, enat/configs, …)
    under `into`, for Ray to ship to the job's driver and every worker as a py_module."""
    import shutil

    package = into / "enat"
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO_ROOT / folder, package / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def runtime_env(package: Path | None, env_vars: dict[str, str]) -> dict[str, Any]:
    """The job's runtime env: `env_vars` (job_environment: settings, never keys) and the
    settings of enat's Ray workers (ray_session.WORKER_SETTINGS), and the checkout's `enat`
    package when one is given (the cluster's Python must already have the dependencies)."""
    env: dict[str, Any] = {"env_vars": {**WORKER_SETTINGS, **env_vars}}
    if package is not None:
        env["py_modules"] = [str(package)]
    return env


def entrypoint(command: list[str], working_dir: bool) -> str:
    """`enat …` when enat is installed on the cluster, `python -m enat.cluster.cli …` when
    the checkout travels with the job."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("nothing to submit; usage: enat submit -- <enat command …>")
    if command[0] == "enat":
        command = command[1:]
    prefix = ["python", "-m", "enat.cluster.cli"] if working_dir else ["enat"]
    return shlex.join(prefix + command)


@_token_refusals_as_user_errors
def submit(args: argparse.Namespace, agent_wait: float = 90.0) -> int:
    import tempfile

    command = entrypoint(args.enat_command, args.working_dir)  # bad input fails before connecting
    env_vars = job_environment(args.forward_credentials)
    jobs = client(args.address)
    deadline = time.monotonic() + agent_wait
    with tempfile.TemporaryDirectory(prefix="enat-submit-") as staging:
        package = checkout_package(Path(staging)) if args.working_dir else None
        while True:
            try:
                job_id = jobs.submit_job(  # uploads the package before it returns
                    entrypoint=command, runtime_env=runtime_env(package, env_vars),
                    submission_id=args.job_id)
                break
            except RuntimeError as err:
                # A head that just started answers 500 until its job agent is up.
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    print(job_id)
    if args.wait:
        return wait(args.address, job_id, follow_logs=True)
    return 0


def wait(address: str | None, job_id: str, follow_logs: bool = False, timeout: float = 0) -> int:
    """Poll until the job ends; exit code 0 only for SUCCEEDED."""
    from ray.job_submission import JobStatus

    jobs, start, printed = client(address), time.monotonic(), 0
    while True:
        status = jobs.get_job_status(job_id)
        if follow_logs:
            logs = jobs.get_job_logs(job_id)
            sys.stdout.write(logs[printed:])
            printed = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"job {job_id}: {status.value}", file=sys.stderr)
            return 0 if status == JobStatus.SUCCEEDED else 1
        if timeout and time.monotonic() - start > timeout:
            print(f"job {job_id}: still {status.value} after {timeout:.0f} s", file=sys.stderr)
            return 3
        time.sleep(1.0)


@_token_refusals_as_user_errors
def jobs_action(action: str, args: argparse.Namespace) -> int:
    jobs = client(args.address)
    if action == "list":
        for job in jobs.list_jobs():
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
    elif action == "status":
        print(jobs.get_job_status(args.job_id).value)
    elif action == "logs":
        print(jobs.get_job_logs(args.job_id), end="")
    elif action == "stop":
        stopped = jobs.stop_job(args.job_id)
        print("stopping" if stopped else "already finished")
    elif action == "wait":
        return wait(args.address, args.job_id, timeout=args.timeout)
    return 0


def _address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=f"Ray dashboard URL (default $RAY_ADDRESS or {DEFAULT_ADDRESS})")


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    _address(parser)
    parser.add_argument("--working-dir", action="store_true",
                        help="ship this checkout to the job as its enat package "
                             "(else enat must be installed on the cluster)")
    parser.add_argument("--forward-credentials", action="store_true",
                        help="forward AWS_SHARED_CREDENTIALS_FILE/AWS_PROFILE (a file the nodes can read; "
                             "keys never travel)")
    parser.add_argument("--job-id", help="submission id (default: generated)")
    parser.add_argument("--wait", action="store_true", help="follow logs until the job ends")
    parser.add_argument("enat_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="the enat command to run, after --")


def _job_arguments(action: str):
    def add(parser: argparse.ArgumentParser) -> None:
        _address(parser)
        if action != "list":
            parser.add_argument("job_id")
        if action == "wait":
            parser.add_argument("--timeout", type=float, default=0, help="seconds (0 = no limit)")
    return add


def commands() -> dict[str, dict[str, Command]]:
    helps = {"list": "list jobs with their status", "status": "print one job's status",
             "logs": "print one job's logs", "stop": "stop a running job",
             "wait": "wait for a job to end (exit 0 if it succeeded)"}
    return {
        "": {"submit": Command("submit an enat command to a Ray cluster (Job API); prints the job id",
                               None, lambda _c, args: submit(args), add_arguments=_submit_arguments)},
        "jobs": {action: Command(text, None, (lambda a: lambda _c, args: jobs_action(a, args))(action),
                                 add_arguments=_job_arguments(action))
                 for action, text in helps.items()},
    }


GROUP_HELP = {"jobs": "cluster jobs: list, status, logs, stop, wait"}
