"""The cluster manifests (configs/cluster/) stay runnable as the code moves: their enat
commands parse with the real CLI parser and name presets that load, they ask for the GPUs
the preset trains on, they run the Ray that constraints.txt pins, and they hold no
credential. The last test feeds each check a broken manifest to show it can fail."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from enat.cluster.cli import all_commands, command_config, parse, with_default_subcommand
from enat.models.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "configs" / "cluster"
RAY_CLUSTER = CLUSTER / "ray-cluster-gpu.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
ENAT_L_PRESET = ROOT / "configs" / "train" / "enat-l-imagenet256.yaml"
# What never belongs in an upload of the checkout: environments, state, outputs.
NEVER_UPLOADED = [".venv", ".enat", ".git", "demo-out", "**/__pycache__", "*.egg-info", ".pytest_cache",
                  ".ruff_cache", "bench/results"]
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# What the pods need from the Secret: storage keys and where storage and MLflow are.
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}
GLOBAL_BATCH = 2048  # ENAT's released ImageNet-256 recipe


def ray_pin() -> str:
    match = re.search(r"^ray(?:\[[^\]]*\])?==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert match, "constraints.txt pins no ray version"
    return match.group(1)


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rayjob() -> dict[str, Any]:
    (job,) = [doc for doc in documents(RAYJOB) if doc["kind"] == "RayJob"]
    return job


# -- enat commands -------------------------------------------------------------------------

def parse_enat(argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    """(command words, arguments) as `enat` parses argv (enat.cluster.cli.parse)."""
    assert argv[:1] == ["enat"], f"not an enat command: {shlex.join(argv)}"
    groups, _, defaults = all_commands()
    words = with_default_subcommand(argv[1:], groups, defaults)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            args = parse(argv[1:])
    except SystemExit:
        raise AssertionError(f"{shlex.join(argv)}: {errors.getvalue().strip()}") from None
    assert hasattr(args, "command"), f"{shlex.join(argv)}: names no command"
    first = words.index(next(word for word in words if not word.startswith("-")))
    top_level = words[first] in groups[""]  # else a group: `enat jobs logs …`
    return words[first:first + (1 if top_level else 2)], args


def check_enat(argv: list[str]) -> list[Any]:
    """Parse argv and validate its config; returns the (train config, launch config) pairs
    of the train commands in it, `enat submit -- <command>` included."""
    name, args = parse_enat(argv)
    if name == ["submit"]:
        inner = args.enat_command[1:] if args.enat_command[:1] == ["--"] else args.enat_command
        return check_enat(inner if inner[:1] == ["enat"] else ["enat", *inner])
    try:
        job = command_config(args)
        if name == ["train"]:
            return [(job, job.launch)]
    except ConfigError as err:
        raise AssertionError(f"{shlex.join(argv)}: {err}") from None
    return []


def comment_commands(path: Path) -> list[list[str]]:
    """The `#   enat …` usage lines of a file's comments (read as a shell would: a trailing
    `# …` is a comment)."""
    lines = re.findall(r"^#\s+(enat\s.*)$", path.read_text(), re.M)
    return [shlex.split(line, comments=True) for line in lines]


def manifest_commands(path: Path) -> list[list[str]]:
    commands = comment_commands(path)
    if path == RAYJOB:
        commands.append(shlex.split(rayjob()["spec"]["entrypoint"]))
    return commands


# -- GPUs, images, credentials ------------------------------------------------------------------

def ray_cluster_gpus(config: dict[str, Any]) -> int:
    """GPUs the launcher may start; every worker node type must have some, the head none."""
    total = 0
    for name, node_type in config["available_node_types"].items():
        gpus = node_type.get("resources", {}).get("GPU", 0)
        if name == config["head_node_type"]:
            assert gpus == 0, f"head node type {name} offers GPUs: training would not use them"
            continue
        assert gpus >= 1, f"worker node type {name} requests no GPU"
        total += gpus * min(node_type["max_workers"], config["max_workers"])
    return total


def rayjob_gpus(job: dict[str, Any]) -> int:
    """GPUs of the RayJob's worker groups; each group's containers must ask for some."""
    total = 0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        resources = [c.get("resources", {}) for c in group["template"]["spec"]["containers"]]
        gpus = sum(int(r.get("limits", {}).get("nvidia.com/gpu", 0)) for r in resources)
        assert gpus >= 1, f"worker group {group['groupName']} requests no GPU"
        assert all(r.get("requests", {}).get("nvidia.com/gpu", r["limits"].get("nvidia.com/gpu"))
                   == r["limits"].get("nvidia.com/gpu") for r in resources), "GPU requests must equal limits"
        total += gpus * group["replicas"]
    return total


def pod_containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [container for template in pod_templates(job) for container in template["spec"]["containers"]]


def pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


# -- who may reach the cluster ----------------------------------------------------------------

DASHBOARD_PORT = 8265  # the Job API: it runs any code it is sent


def rayjob_auth_gaps(job: dict[str, Any]) -> list[str]:
    """Why the RayJob's cluster would accept requests without Ray's token."""
    options = job["spec"]["rayClusterSpec"].get("authOptions", {})
    gaps = [] if options.get("mode") == "token" else ["authOptions.mode is not token"]
    if not options.get("secretName"):
        gaps.append("authOptions.secretName is not set: the token Secret's name is not known in advance")
    for container in pod_containers(job):
        for env in container.get("env", []):
            if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                gaps.append(f"{container['name']} sets RAY_AUTH_MODE={env.get('value')}")
            if env["name"] == "RAY_AUTH_TOKEN" and "value" in env:
                gaps.append(f"{container['name']} has the token written out")
    return gaps


def launcher_auth_gaps(config: dict[str, Any]) -> list[str]:
    """Why the launcher's nodes would start Ray without token authentication."""
    gaps = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            if re.search(r"\bray start\b", command) and not re.search(r"\bRAY_AUTH_MODE=token\s+ray start\b",
                                                                        command):
                gaps.append(f"{key}: `{command[:60]}` starts Ray without RAY_AUTH_MODE=token")
    if config.get("file_mounts", {}).get("~/.ray/auth_token") != "~/.ray/auth_token":
        gaps.append("file_mounts does not copy ~/.ray/auth_token to the nodes")
    return gaps


def network_policy_gaps(job: dict[str, Any], policies: list[dict[str, Any]]) -> list[str]:
    """Who besides the cluster's own pods may connect to them: a NetworkPolicy must select
    every Ray pod and let in only its own pods, plus named pods on the dashboard port."""
    own = [template.get("metadata", {}).get("labels", {}) for template in pod_templates(job)]
    covering = [policy for policy in policies
                if "Ingress" in policy["spec"].get("policyTypes", [])
                and (selector := policy["spec"]["podSelector"].get("matchLabels"))
                and all(selector.items() <= labels.items() for labels in own)]
    if not covering:
        return ["no NetworkPolicy selects all of the RayJob's pods"]
    gaps = []
    for policy in covering:
        own_selector = policy["spec"]["podSelector"]["matchLabels"]
        for index, rule in enumerate(policy["spec"].get("ingress", [])):
            peers = rule.get("from", [])
            if not peers:
                gaps.append(f"ingress rule {index} admits every source")
                continue
            if all(set(peer) == {"podSelector"} and peer["podSelector"].get("matchLabels") == own_selector
                   for peer in peers):
                continue  # the cluster's own pods, on any port
            ports = [port.get("port") for port in rule.get("ports", [])]
            if ports != [DASHBOARD_PORT]:
                gaps.append(f"ingress rule {index} opens ports {ports or 'all'} to other pods")
            for peer in peers:
                if "ipBlock" in peer or not peer.get("podSelector", {}).get("matchLabels"):
                    gaps.append(f"ingress rule {index} admits {peer}: not a named pod")
    return gaps


def literal_credentials(node: Any, where: str = "") -> list[str]:
    """Where a credential's value is written out instead of referenced (secretKeyRef,
    envFrom, or a ${NAME} / $NAME shell reference)."""
    found = []
    if isinstance(node, dict):
        if node.get("name") in CREDENTIALS and "value" in node:
            found.append(f"{where}: env {node['name']} has a literal value")
        for key, value in node.items():
            if key in CREDENTIALS and not (isinstance(value, str) and re.fullmatch(r"\$\{?\w+\}?", value)):
                found.append(f"{where}.{key}: literal value")
            found += literal_credentials(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += literal_credentials(item, f"{where}[{index}]")
    elif isinstance(node, str):
        pattern = rf"\b({'|'.join(CREDENTIALS)})\s*[=:]\s*['\"]?([^\s'\"]+)"
        for name, value in re.findall(pattern, node):
            if not value.startswith(("$", "<")):  # a reference, or a <placeholder>
                found.append(f"{where}: {name} set to a literal in {node[:60]!r}")
    return found


def credential_patterns(text: str) -> list[str]:
    """Real-looking AWS key ids anywhere in a file, comments included."""
    return re.findall(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", text)


def example_secret(text: str) -> dict[str, Any]:
    """The commented example Secret between the `# >>> example Secret` markers."""
    block = re.search(r"^# >>> example Secret\n(.*?)^# <<< example Secret", text, re.M | re.S)
    assert block, "the example Secret is missing"
    return yaml.safe_load("\n".join(line[2:] for line in block.group(1).splitlines()))


# -- the manifests --------------------------------------------------------------------------

def test_ray_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = documents(RAY_CLUSTER)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_installs_this_checkout_with_the_pins():
    (config,) = documents(RAY_CLUSTER)
    assert "." in config["file_mounts"].values(), "the checkout is not uploaded"
    installs = [c for c in config["setup_commands"] if re.search(r"\bpip install\b", c)]
    assert any(re.search(r"-c \S*constraints\.txt", c) and " -e " in c for c in installs), installs
    missing = set(NEVER_UPLOADED) - set(config.get("rsync_exclude", []))
    assert not missing, f"rsync would upload {sorted(missing)}"


@pytest.mark.parametrize("path", [RAY_CLUSTER, RAYJOB, ENAT_L_PRESET], ids=lambda p: p.name)
def test_enat_commands_parse_and_their_presets_load(path):
    commands = manifest_commands(path)
    trains = [pair for argv in commands for pair in check_enat(argv)]
    assert trains, f"{path.name} runs no `enat train`"
    for train, launch in trains:
        assert train.data.url, "data.url is not set"
        assert launch.use_gpu != "no"


@pytest.mark.parametrize("path", [RAY_CLUSTER, RAYJOB], ids=lambda p: p.name)
def test_the_cluster_has_the_gpus_the_preset_trains_on(path):
    manifest = rayjob() if path == RAYJOB else documents(path)[0]
    gpus = rayjob_gpus(manifest) if path == RAYJOB else ray_cluster_gpus(manifest)
    for argv in manifest_commands(path):
        for train, launch in check_enat(argv):
            assert launch.num_workers <= gpus, f"{launch.num_workers} workers, {gpus} GPUs"
            if train.model.kind == "enat" and train.model.width == 1024:  # ENAT-L
                assert train.batch_size * train.grad_accum * launch.num_workers == GLOBAL_BATCH


def test_rayjob_pods_take_settings_from_the_secret_only():
    docs = documents(RAYJOB)
    assert "Secret" not in [doc["kind"] for doc in docs], "a live Secret would overwrite the real keys"
    job = rayjob()
    secret = example_secret(RAYJOB.read_text())
    assert secret["kind"] == "Secret" and SECRET_KEYS <= set(secret["stringData"])
    assert all(re.fullmatch(r"<[^>]+>", value) for value in secret["stringData"].values()), "not placeholders"
    for container in pod_containers(job):
        refs = [source["secretRef"]["name"] for source in container.get("envFrom", [])
                if "secretRef" in source]
        assert refs == [secret["metadata"]["name"]], f"{container['name']} reads {refs}"
    assert "env_vars" not in (yaml.safe_load(job["spec"].get("runtimeEnvYAML", "")) or {})


@pytest.mark.parametrize("path", [RAY_CLUSTER, RAYJOB, DOCKERFILE], ids=lambda p: p.name)
def test_no_literal_credentials(path):
    text = path.read_text()
    assert not credential_patterns(text)
    if path.suffix == ".yaml":
        assert not literal_credentials(documents(path))
    assert not literal_credentials(text.splitlines())


def test_images_run_the_pinned_ray():
    pin = ray_pin()
    base = f"rayproject/ray:{pin}-py311-gpu"
    assert re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M) == [base]
    (config,) = documents(RAY_CLUSTER)
    docker = config["docker"]
    assert {docker["image"], docker.get("head_image", base), docker.get("worker_image", base)} == {base}
    job = rayjob()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pin
    for container in pod_containers(job):
        assert container["image"].endswith(f"-ray{pin}-py311-gpu"), container["image"]


def test_only_token_holders_reach_the_job_api():
    assert not rayjob_auth_gaps(rayjob())
    (config,) = documents(RAY_CLUSTER)
    assert not launcher_auth_gaps(config)


def test_a_network_policy_fences_the_rayjob_pods():
    policies = [doc for doc in documents(RAYJOB) if doc["kind"] == "NetworkPolicy"]
    assert not network_policy_gaps(rayjob(), policies)


# -- the checks themselves ------------------------------------------------------------------

def test_checks_catch_broken_manifests():
    for argv, message in ((["enat", "train", "--confg", "enat-l-imagenet256"], "unrecognized"),
                          (["enat", "train", "--config", "no-such-preset"], "unknown preset"),
                          (["enat", "train", "--config", "enat-l-imagenet256", "lr=fast"], "lr"),
                          (["enat", "submit", "--", "enat", "trian"], "invalid choice"),
                          (["enat", "pretokenize", "--source", "imagenet:x", "workers=-1"], "workers")):
        with pytest.raises(AssertionError, match=message):
            check_enat(argv)

    (config,) = documents(RAY_CLUSTER)
    no_gpus = copy.deepcopy(config)
    no_gpus["available_node_types"]["gpu_8xa100"]["resources"].pop("GPU")
    with pytest.raises(AssertionError, match="requests no GPU"):
        ray_cluster_gpus(no_gpus)
    job = rayjob()
    cpu_only = copy.deepcopy(job)
    for container in pod_containers(cpu_only):
        for section in container["resources"].values():
            section.pop("nvidia.com/gpu", None)
    with pytest.raises(AssertionError, match="requests no GPU"):
        rayjob_gpus(cpu_only)

    leaky = copy.deepcopy(job)
    pod_containers(leaky)[0]["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]
    assert literal_credentials(leaky)
    assert len(literal_credentials(["export AWS_SECRET_ACCESS_KEY=abc", "MLFLOW_TRACKING_TOKEN: 't'"])) == 2
    assert literal_credentials(["export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}"]) == []
    assert literal_credentials({"env": [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {}}]}) == []
    assert credential_patterns("key: AKIAABCDEFGHIJKLMNOP")

    no_auth = copy.deepcopy(job)
    no_auth["spec"]["rayClusterSpec"].pop("authOptions")
    assert len(rayjob_auth_gaps(no_auth)) == 2
    pod_containers(no_auth)[1]["env"] = [{"name": "RAY_AUTH_MODE", "value": "disabled"}]
    assert "ray-worker sets RAY_AUTH_MODE=disabled" in rayjob_auth_gaps(no_auth)
    open_launcher = copy.deepcopy(config)
    open_launcher["worker_start_ray_commands"][-1] = "ray start --address=$RAY_HEAD_IP:6379"
    open_launcher["file_mounts"].pop("~/.ray/auth_token")
    assert len(launcher_auth_gaps(open_launcher)) == 2

    policies = [doc for doc in documents(RAYJOB) if doc["kind"] == "NetworkPolicy"]
    assert network_policy_gaps(job, []) == ["no NetworkPolicy selects all of the RayJob's pods"]
    unlabelled = copy.deepcopy(job)
    unlabelled["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"].pop("metadata")
    assert network_policy_gaps(unlabelled, policies) == ["no NetworkPolicy selects all of the RayJob's pods"]
    wide_open = copy.deepcopy(policies)
    wide_open[0]["spec"]["ingress"].append({})
    assert network_policy_gaps(job, wide_open) == ["ingress rule 2 admits every source"]
    any_port = copy.deepcopy(policies)
    any_port[0]["spec"]["ingress"][1].pop("ports")
    any_port[0]["spec"]["ingress"][1]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})
    assert len(network_policy_gaps(job, any_port)) == 2
