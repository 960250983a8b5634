"""The cluster launch files under cluster/: Ray's own checks of the launcher YAMLs (its JSON schema, its deeper
`validate_config(prepare_config(...))`), Ray's AWS bootstrap (the code path of `ray up`) against moto's fake AWS in a
network namespace with loopback only, the KubeRay manifests, and the Dockerfile's pins against pyproject.toml and
scripts/bootstrap.sh (Docker itself cannot run here).

Run as a script (`python tests/test_cluster_configs.py CONFIG OUT.json`), this file is the bootstrap probe that the
AWS test starts inside the namespace.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER = REPO_ROOT / "cluster"
LAUNCHER_FILES = {"aws": CLUSTER / "aws-gpu.yaml", "gcp": CLUSTER / "gcp-gpu.yaml"}
KUBERAY_CLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
KUBERAY_JOB = CLUSTER / "kuberay" / "rayjob-table-row.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
DRIVER_RESOURCE = "knetlab_driver"
# The oldest NVIDIA Linux driver family each CUDA release runs on (NVIDIA's CUDA release notes: 12.8 needs 570.26,
# 13.0 needs 580.65); torch's CUDA wheels bring their runtime and need that driver or newer on the node.
MIN_DRIVER_FOR_CUDA = {"cu128": 570, "cu130": 580}
# What EC2 says each instance type has (moto serves AWS's own instance-type data); Ray must fill these in.
EXPECTED_AWS_SHAPES = {
    "m6i.2xlarge": (8, 0),
    "g6.2xlarge": (8, 1),
    "g5.2xlarge": (8, 1),
    "g6e.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def pinned_version(package: str) -> str:
    """The `==` pin of `package` in pyproject.toml's dependencies."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"\s;]+)"', text)
    assert match, f"pyproject.toml pins no {package}=="
    return match.group(1)


def bootstrap_torch_spec() -> str:
    bootstrap = (REPO_ROOT / "scripts" / "bootstrap.sh").read_text()
    match = re.search(r'TORCH_SPEC=\$\{KNETLAB_TORCH:-"([^"]+)"\}', bootstrap)
    assert match, "scripts/bootstrap.sh no longer sets TORCH_SPEC=${KNETLAB_TORCH:-\"...\"}"
    return match.group(1)


def ray_schema() -> dict:
    import ray

    with open(Path(ray.__file__).parent / "autoscaler" / "ray-schema.json") as f:
        return json.load(f)


def commands_text(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


def mlflow_server_args(command: str) -> list[str]:
    """The arguments of the `mlflow server` command inside a launcher shell command."""
    start = command.index("mlflow server")
    return shlex.split(command[start:].replace("'", " ").split(">", 1)[0])


# -- Ray's own checks of the launcher files ------------------------------------------------------------------------
@pytest.mark.parametrize("provider", sorted(LAUNCHER_FILES))
def test_launcher_file_matches_rays_json_schema(provider: str):
    import jsonschema

    schema = ray_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator(schema).validate(load_yaml(LAUNCHER_FILES[provider]))


@pytest.mark.parametrize("provider", sorted(LAUNCHER_FILES))
def test_launcher_file_passes_rays_validate_config(provider: str):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(load_yaml(LAUNCHER_FILES[provider]))
    validate_config(cfg)
    assert cfg["head_node_type"] == "head"
    assert cfg["provider"]["type"] == provider


@pytest.mark.parametrize("breakage", ["misspelt_top_level_key", "node_type_without_resources", "string_gpu_count"])
def test_rays_checks_reject_a_broken_launcher_file(breakage: str):
    """The same checks fail on a broken copy: a typo at the top, a pool without `resources`, GPUs as a string."""
    import jsonschema

    cfg = copy.deepcopy(load_yaml(LAUNCHER_FILES["gcp"]))
    if breakage == "misspelt_top_level_key":
        cfg["idle_timeout_minute"] = cfg.pop("idle_timeout_minutes")
    elif breakage == "node_type_without_resources":
        del cfg["available_node_types"]["gpu1-spot-l4"]["resources"]
    else:
        cfg["available_node_types"]["gpu1-spot-l4"]["resources"]["GPU"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(ray_schema()).validate(cfg)


# -- Ray's AWS bootstrap against moto in a loopback-only network namespace -----------------------------------------
def _network_namespace_works() -> str | None:
    """None when `unshare --net` and `ip` can make a loopback-only namespace here, else why not."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is not installed"
    probe = subprocess.run(["unshare", "--net", "--", "sh", "-c", "ip link set lo up && ip -o link show"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --net failed ({probe.returncode}): {probe.stderr.strip()[:300]}"
    links = [line.split(":")[1].strip() for line in probe.stdout.splitlines() if ":" in line]
    if links != ["lo"]:
        return f"the new namespace has more than loopback: {links}"
    return None


def _bootstrap_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        HOME=str(home),  # Ray writes the new key pair's private key to ~/.ssh/knetlab.pem
        AWS_ACCESS_KEY_ID="testing",  # moto's fake credentials, set by this test only
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def test_aws_bootstrap_in_moto_fills_in_each_pools_cpus_and_gpus(tmp_path: Path):
    cfg = load_yaml(LAUNCHER_FILES["aws"])
    out = tmp_path / "bootstrap.json"
    home = tmp_path / "home"
    home.mkdir()
    probe = [sys.executable, str(Path(__file__).resolve()), str(LAUNCHER_FILES["aws"]), str(out)]
    why_not = _network_namespace_works()
    if why_not is None:
        command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "probe", *probe]
    else:
        warnings.warn(f"no network namespace ({why_not}): moto and Ray's bootstrap run on this host's loopback",
                      stacklevel=1)
        command = probe
    done = subprocess.run(command, env=_bootstrap_env(home), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    result = json.loads(out.read_text())
    if why_not is None:
        assert result["interfaces"] == ["lo"], result["interfaces"]  # nothing could have left the machine

    resources = result["resources"]
    for node_type, node in cfg["available_node_types"].items():
        cpus, gpus = EXPECTED_AWS_SHAPES[node["node_config"]["InstanceType"]]
        filled = resources[node_type]
        assert filled.get("CPU") == cpus, (node_type, filled)
        assert filled.get("GPU", 0) == gpus, (node_type, filled)
        assert {k: filled[k] for k in node["resources"]} == node["resources"], "the file's own resources are kept"
        if node_type != cfg["head_node_type"]:
            assert filled["memory"] > 0, (node_type, filled)
            assert DRIVER_RESOURCE not in filled, f"{node_type}: trial drivers must not land on a worker pool"
            assert any(key.startswith("accelerator_type:") for key in filled), filled
    assert resources["head"][DRIVER_RESOURCE] >= 1

    # What `ray up` would launch with: our key pair, a subnet per listed zone, the cluster's security group, and our
    # instance profiles (Ray did not create its own broad ray-autoscaler-v1 role).
    zones = cfg["provider"]["availability_zone"].split(",")
    for node_type, node_config in result["node_configs"].items():
        assert node_config["KeyName"] == "knetlab", node_type
        assert len(node_config["SubnetIds"]) == len(zones), node_type
        assert node_config["SecurityGroupIds"] == [result["security_group"]["GroupId"]], node_type
        assert node_config["IamInstanceProfile"] == cfg["available_node_types"][node_type]["node_config"][
            "IamInstanceProfile"]
    assert sorted(result["instance_profiles"]) == ["knetlab-head", "knetlab-worker"]
    assert result["private_key_file"] and (home / ".ssh" / "knetlab.pem").is_file()

    # The security group opens SSH to the world and everything only within the group: not the dashboard, not MLflow.
    rules = result["security_group"]["IpPermissions"]
    public = [r for r in rules if any(ip["CidrIp"] == "0.0.0.0/0" for ip in r.get("IpRanges", []))]
    assert [(r["FromPort"], r["ToPort"]) for r in public] == [(22, 22)], rules
    for rule in rules:
        if rule not in public:
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [result["security_group"]["GroupId"]], rule


def bootstrap_in_moto(config_path: str, out_path: str) -> None:
    """The probe: a moto server on 127.0.0.1, the IAM roles created from cluster/aws-iam/ as docs/cluster.md does,
    then the bootstrap `ray up` runs (`_bootstrap_config`: prepare, fill in resources, validate, bootstrap_aws)."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        cfg = load_yaml(Path(config_path))
        region = cfg["provider"]["region"]
        iam_dir = Path(config_path).parent / "aws-iam"
        iam = boto3.client("iam", region_name=region)
        trust = (iam_dir / "ec2-trust-policy.json").read_text()
        for name, policy in (("knetlab-head", "head-policy.json"), ("knetlab-worker", "worker-policy.json")):
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)
            iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=(iam_dir / policy).read_text())
            iam.create_instance_profile(InstanceProfileName=name)
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)

        from ray.autoscaler._private.commands import _bootstrap_config

        resolved = _bootstrap_config(cfg, no_config_cache=True)
        ec2 = boto3.client("ec2", region_name=region)
        group_ids = {g for n in resolved["available_node_types"].values() for g in n["node_config"]["SecurityGroupIds"]}
        assert len(group_ids) == 1, group_ids
        group = ec2.describe_security_groups(GroupIds=sorted(group_ids))["SecurityGroups"][0]
        result = {
            "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "resources": {k: v["resources"] for k, v in resolved["available_node_types"].items()},
            "node_configs": {k: v["node_config"] for k, v in resolved["available_node_types"].items()},
            "security_group": {"GroupId": group["GroupId"], "IpPermissions": group["IpPermissions"]},
            "instance_profiles": [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]],
            "private_key_file": resolved["auth"].get("ssh_private_key"),
        }
        Path(out_path).write_text(json.dumps(result, default=str))
    finally:
        server.stop()


# -- what the launcher files promise beyond Ray's checks ----------------------------------------------------------
@pytest.mark.parametrize("provider", sorted(LAUNCHER_FILES))
def test_launcher_file_keeps_services_private_and_drivers_on_demand(provider: str):
    cfg = load_yaml(LAUNCHER_FILES[provider])
    head_start = commands_text(cfg, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start

    args = mlflow_server_args(head_start)
    host = args[args.index("--host") + 1]
    assert host == '"$KNETLAB_HEAD_IP"' or host == "$KNETLAB_HEAD_IP", host  # the private address Ray uses
    assert "ray.util.get_node_ip_address()" in head_start
    assert "--artifacts-destination" in args and "--default-artifact-root" not in args
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    # Job drivers on the head inherit the tracking URI from `ray start`; workers from theirs.
    assert head_start.index("export MLFLOW_TRACKING_URI") < head_start.index("ray start --head")
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in commands_text(cfg, "worker_start_ray_commands")

    pinned_ray = pinned_version("ray")
    assert f"ray.__version__ == '{pinned_ray}'" in commands_text(cfg, "setup_commands")

    node_types = cfg["available_node_types"]
    assert DRIVER_RESOURCE in node_types[cfg["head_node_type"]]["resources"]
    for name, node in node_types.items():
        if name == cfg["head_node_type"]:
            continue
        assert DRIVER_RESOURCE not in node["resources"], name
        node_config = node["node_config"]
        if provider == "aws":
            spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        else:
            spot = node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"
        assert spot == name.startswith("gpu1-spot-"), f"{name}: spot pools are gpu1-spot-*, the 8-GPU pools on demand"
    pools = {name.rsplit("-", 1)[0] for name in node_types if name != "head"}
    assert pools == {"gpu1-spot", "gpu8"}, pools
    assert sum(1 for name in node_types if name.startswith("gpu1-spot-")) >= 2, "several instance types per pool"
    assert sum(1 for name in node_types if name.startswith("gpu8-")) >= 2, "several instance types per pool"
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", run_options).group(1)
    assert cfg["file_mounts"][token_path] == "~/.ray/auth_token"


def test_aws_file_agrees_with_itself_and_its_iam_policies():
    cfg = load_yaml(LAUNCHER_FILES["aws"])
    region = cfg["provider"]["region"]
    assert f"--env AWS_REGION={region}" in cfg["docker"]["run_options"]
    registry = cfg["docker"]["image"].split("/", 1)[0]
    assert registry.endswith(f".ecr.{region}.amazonaws.com")
    assert f"--password-stdin {registry}" in commands_text(cfg, "initialization_commands")
    assert f"--region {region}" in commands_text(cfg, "initialization_commands")
    for zone in cfg["provider"]["availability_zone"].split(","):
        assert zone.startswith(region), zone

    args = mlflow_server_args(commands_text(cfg, "head_start_ray_commands"))
    bucket = args[args.index("--artifacts-destination") + 1].removeprefix("s3://").split("/", 1)[0]
    iam_dir = CLUSTER / "aws-iam"
    for policy_file in ("head-policy.json", "worker-policy.json"):
        policy = json.loads((iam_dir / policy_file).read_text())
        resources = [s["Resource"] for s in policy["Statement"] if any(a.startswith("s3:") for a in s["Action"])]
        assert sorted(resources) == [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"], (policy_file, resources)
    head_policy = json.loads((iam_dir / "head-policy.json").read_text())
    passed = [s["Resource"] for s in head_policy["Statement"] if s["Action"] == "iam:PassRole"]
    worker_profiles = {n["node_config"]["IamInstanceProfile"]["Name"] for k, n in cfg["available_node_types"].items()
                       if k != cfg["head_node_type"]}
    assert worker_profiles == {"knetlab-worker"}
    assert passed == ["arn:aws:iam::*:role/knetlab-worker"]
    assert cfg["available_node_types"]["head"]["node_config"]["IamInstanceProfile"] == {"Name": "knetlab-head"}


# -- KubeRay ---------------------------------------------------------------------------------------------------------
def _kuberay_documents() -> dict[str, dict]:
    documents = {}
    for path in (KUBERAY_CLUSTER, KUBERAY_JOB):
        with open(path) as f:
            for document in yaml.safe_load_all(f):
                if document:
                    documents[document["kind"]] = document
    return documents


def _gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_kuberay_raycluster_has_a_cpu_head_and_gpu_worker_groups():
    documents = _kuberay_documents()
    assert {"ServiceAccount", "PersistentVolumeClaim", "RayCluster", "RayJob"} <= set(documents)
    cluster = documents["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned_version("ray")
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    head_resources = json.loads(json.loads(head["rayStartParams"]["resources"]))  # KubeRay's quoted-JSON format
    assert head_resources[DRIVER_RESOURCE] >= 1
    head_containers = {c["name"]: c for c in head["template"]["spec"]["containers"]}
    assert set(head_containers) == {"ray-head", "mlflow"}
    assert all(_gpu_limit(c) == 0 for c in head_containers.values()), "the head has no GPU"
    env = {e["name"]: e for e in head_containers["ray-head"]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://$(MY_POD_IP):5000"
    assert env["MY_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    mlflow = head_containers["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"] and "--port=5000" in mlflow
    assert any(a.startswith("--artifacts-destination=s3://") for a in mlflow)
    assert not any(a.startswith("--allowed-hosts") for a in mlflow), "keep MLflow's host-header defaults"

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu1-spot", "gpu8"}
    images = {c["image"] for c in head_containers.values()}
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], name
        assert DRIVER_RESOURCE not in json.dumps(group.get("rayStartParams", {})), name
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert _gpu_limit(container) == int(requests["nvidia.com/gpu"]) == (1 if name == "gpu1-spot" else 8), name
        images.add(container["image"])
        tolerations = group["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        # Room for the table's workers: trainer.cpus_per_worker CPUs per GPU.
        cpus_per_worker = load_yaml(REPO_ROOT / "experiments" / "ade20k" / "_base.yaml")["trainer"]["cpus_per_worker"]
        assert float(limits["cpu"]) >= cpus_per_worker * _gpu_limit(container), name
    assert len(images) == 1, f"every container runs the same knetlab image: {images}"
    assert documents["RayJob"]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] in images


def test_kuberay_rayjob_runs_a_table_row_that_knetlab_accepts():
    from knetlab.platform.config import load_config

    documents = _kuberay_documents()
    job = documents["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": documents["RayCluster"]["metadata"]["name"]}
    words = spec["entrypoint"].split()
    assert words[:2] == ["knetlab", "train"]
    experiment, overrides = words[2], words[3:]
    assert re.fullmatch(r"experiments/ade20k/knet-s3_[^/]+\.yaml", experiment), experiment
    assert (REPO_ROOT / experiment).is_file(), experiment
    assert {"trainer.num_workers=8", "trainer.use_gpu=true"} <= set(overrides)
    assert any(o.startswith("storage.uri=s3://") for o in overrides)
    cfg = load_config(REPO_ROOT / experiment, overrides)  # every override is a key knetlab knows, with a valid value
    assert cfg.trainer.num_workers == 8 and cfg.trainer.use_gpu is True
    assert cfg.storage.uri.startswith("s3://")

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/knetlab"  # the image's copy (cluster/docker/Dockerfile)
    assert {".git", ".venv", "runs", "data"} <= set(runtime_env["excludes"])
    assert "WORKDIR /home/ray/knetlab" in DOCKERFILE.read_text()


# -- the Dockerfile ----------------------------------------------------------------------------------------------------
def _dockerfile_args(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(.+)$", text, re.MULTILINE)}


def test_dockerfile_pins_agree_with_pyproject_and_bootstrap():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-(?P<cuda>cu\d+)", base)
    assert match, f"base image {base} is not a rayproject/ray:<version>-py<XY>-cu<NNN> tag"
    ray_pin = pinned_version("ray")
    assert match["ray"] == ray_pin, f"base image has Ray {match['ray']}, pyproject.toml pins {ray_pin}"
    requires = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert (int(match["py"]), int(match["minor"])) >= (int(requires[1]), int(requires[2]))

    args = _dockerfile_args(text)
    assert args["TORCH_SPEC"] == bootstrap_torch_spec(), "the torch/torchvision pair of scripts/bootstrap.sh"
    assert args["TORCH_INDEX"].endswith("/" + match["cuda"]), "torch's CUDA build matches the base image's"
    assert int(args["NVIDIA_DRIVER_MIN"]) == MIN_DRIVER_FOR_CUDA[match["cuda"]], "the driver family of that CUDA"
    assert 'org.knetlab.nvidia-driver-min="${NVIDIA_DRIVER_MIN}"' in text
    assert args["RAY_VERSION"] == ray_pin
    assert '"ray==${RAY_VERSION}"' in text and "> /home/ray/constraints.txt" in text
    assert "-c /home/ray/constraints.txt /home/ray/knetlab" in text
    # timm and mlflow come from pyproject.toml's pins through the knetlab install; the file must not contradict them.
    for package in ("timm", "mlflow", "ray", "torch", "torchvision"):
        for version in re.findall(rf"\b{package}==([\w.]+)", text):
            expected = pinned_version(package) if package in ("timm", "mlflow", "ray") else None
            if expected is None:
                expected = dict(p.split("==") for p in bootstrap_torch_spec().split())[package]
            assert version == expected, (package, version, expected)
    for package in ("timm", "mlflow"):
        pinned_version(package)  # pyproject.toml pins them exactly (== only)


def test_node_images_pin_a_driver_that_runs_the_images_cuda():
    """The driver family travels with the image's CUDA: GCP's image family names both, every AWS node type launches
    the AMI pinned in the account's SSM parameter (never AWS's floating `latest`), and a GPU worker whose driver
    cannot run the image's torch stops at setup."""
    args = _dockerfile_args(DOCKERFILE.read_text())
    cuda = re.search(r"/(cu\d+)$", args["TORCH_INDEX"])[1]
    minimum = int(args["NVIDIA_DRIVER_MIN"])
    gcp = load_yaml(LAUNCHER_FILES["gcp"])
    for name, node in gcp["available_node_types"].items():
        (disk,) = node["node_config"]["disks"]
        image = disk["initializeParams"]["sourceImage"]
        family = re.fullmatch(r".*/family/common-(cu\d+)-ubuntu-\d+-nvidia-(\d+)", image)
        assert family, (name, image)
        assert family[1] == cuda and int(family[2]) >= minimum, (name, family.groups(), cuda, minimum)
    aws = load_yaml(LAUNCHER_FILES["aws"])
    images = {node["node_config"]["ImageId"] for node in aws["available_node_types"].values()}
    assert images == {"resolve:ssm:/knetlab/node-ami"}, images
    head_policy = json.loads((CLUSTER / "aws-iam" / "head-policy.json").read_text())
    ssm = [s["Resource"] for s in head_policy["Statement"] if "ssm:GetParameters" in s["Action"]]
    assert ssm == ["arn:aws:ssm:*:*:parameter/knetlab/*"], ssm
    assert "/knetlab/node-ami" in (REPO_ROOT / "docs" / "cluster.md").read_text()
    for cfg in (aws, gcp):
        assert "assert torch.cuda.is_available()" in commands_text(cfg, "worker_setup_commands")
        assert "torch" not in commands_text(cfg, "head_setup_commands"), "the head has no GPU"


def test_dockerfile_copies_only_what_exists_and_the_ignore_file_keeps_it():
    text = DOCKERFILE.read_text()
    sources = [s for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.MULTILINE) for s in line.split()[:-1]]
    assert sources, "no COPY"
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"  # everything else stays out of the context (.venv is ~7 GB)
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded by Dockerfile.dockerignore"


def test_docs_name_only_files_that_exist():
    docs = (REPO_ROOT / "docs" / "cluster.md").read_text()
    mentioned = set(re.findall(r"\b((?:cluster|experiments|scripts|tests)/[\w./-]+\.(?:yaml|json|md|sh|py))", docs))
    assert {"cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml", "cluster/kuberay/raycluster.yaml"} <= mentioned
    missing = sorted(p for p in mentioned if not (REPO_ROOT / p).exists() and "<" not in p)
    assert missing == [], missing


if __name__ == "__main__":
    bootstrap_in_moto(sys.argv[1], sys.argv[2])
