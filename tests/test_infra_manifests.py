"""The deployment files agree with each other and with the code.

They parse; one image, namespace, service account and Ray version throughout; the services and ConfigMaps they
point at exist; the autoscaling GPU group is sane; and every command they run is accepted by the real parser
(argparse for our entry points, click for `ray job submit` and `ray start`, Ray's own schema for the launcher).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import tomllib
import yaml

from pipeline.backfill.partitions import parse_partition_values
from pipeline.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
AWS_LAUNCHER = INFRA / "aws" / "cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"
NAMESPACED_KINDS = {"ServiceAccount", "ConfigMap", "RayCluster", "RayJob", "CronJob", "Secret", "Service"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [document for document in yaml.safe_load_all(f) if document is not None]


def kubernetes_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_documents(path)]


def objects_of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in kubernetes_objects() if doc["kind"] == kind]


def only(kind: str) -> dict[str, Any]:
    found = objects_of_kind(kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def config_map_named(name: str) -> dict[str, Any]:
    return next(c for c in objects_of_kind("ConfigMap") if c["metadata"]["name"] == name)


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def containers(node: Any) -> list[dict[str, Any]]:
    return [c for mapping in walk(node) for c in mapping.get("containers", []) if isinstance(c, dict)]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(f"RayCluster {c['metadata']['name']}", c["spec"]) for c in objects_of_kind("RayCluster")]
    specs += [(f"RayJob {j['metadata']['name']}", j["spec"]["rayClusterSpec"]) for j in objects_of_kind("RayJob")]
    return specs


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def entry_point_parser(module_name: str):
    assert importlib.util.find_spec(module_name) is not None, f"{module_name} is not importable"
    module = importlib.import_module(module_name)
    return module.build_parser()


def parse_python_module_command(argv: list[str]) -> tuple[str, Any]:
    """`python -m jobs.x ARGS`: the module must import and its own parser must accept ARGS."""
    assert argv[:2] == ["python", "-m"], argv
    module_name, args = argv[2], argv[3:]
    return module_name, entry_point_parser(module_name).parse_args(args)


def parse_ray_job_submit(argv: list[str]) -> dict[str, Any]:
    from ray.dashboard.modules.job.cli import submit

    assert argv[:3] == ["ray", "job", "submit"], argv
    return submit.make_context("submit", list(argv[3:])).params


# --- everything parses, names agree ---------------------------------------------------------------------------


def test_every_deployment_file_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml")) + sorted((REPO / "examples").glob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        assert load_documents(path), f"{path} is empty"


def test_kubernetes_objects_are_complete_and_share_one_namespace() -> None:
    namespace = only("Namespace")["metadata"]["name"]
    names = set()
    for path, doc in kubernetes_objects():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert doc["metadata"].get("name"), path
        if doc["kind"] in NAMESPACED_KINDS:
            assert doc["metadata"].get("namespace") == namespace, f"{path}: {doc['kind']} outside {namespace}"
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in names, f"duplicate {key}"
        names.add(key)


def test_one_image_everywhere() -> None:
    images = {c["image"] for _, doc in kubernetes_objects() for c in containers(doc)}
    launcher = load_documents(AWS_LAUNCHER)[0]
    images.add(launcher["docker"]["image"])
    assert len(images) == 1, images
    image = images.pop()
    assert f"-t {image}" in DOCKERFILE.read_text()
    assert f"-t {image}" in (INFRA / "README.md").read_text()


def test_one_ray_version_everywhere_and_it_satisfies_the_project_requirement() -> None:
    from packaging.requirements import Requirement

    ray_version = dockerfile_args()["RAY_VERSION"]
    for label, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, label
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_requirement = next(Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "ray")
    assert ray_requirement.specifier.contains(ray_version)


def test_pods_run_as_the_declared_service_account() -> None:
    account = only("ServiceAccount")["metadata"]["name"]
    used = {m["serviceAccountName"] for _, doc in kubernetes_objects() for m in walk(doc) if "serviceAccountName" in m}
    assert used == {account}


def test_config_maps_that_pods_mount_exist_and_hold_valid_job_files() -> None:
    config_maps = {cm["metadata"]["name"]: cm for cm in objects_of_kind("ConfigMap")}
    mounted = {m["configMap"]["name"] for _, doc in kubernetes_objects() for m in walk(doc) if "configMap" in m}
    assert mounted and mounted <= set(config_maps)
    for name, config_map in config_maps.items():
        for key, text in config_map["data"].items():
            assert key.endswith(".yaml"), (name, key)
            config = JobConfig.from_dict(yaml.safe_load(text))
            assert config.input.uri and config.output.uri, (name, key)


def test_secrets_referenced_are_optional() -> None:
    # Secrets are created by hand (tokens); a missing one must not keep pods from starting.
    for _, doc in kubernetes_objects():
        for mapping in walk(doc):
            if "secretKeyRef" in mapping:
                assert mapping["secretKeyRef"].get("optional") is True, mapping


# --- clusters --------------------------------------------------------------------------------------------------


def test_clusters_autoscale_a_gpu_worker_group() -> None:
    for label, spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, label
        gpu_groups = []
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (label, group)
            (container,) = containers(group["template"])
            resources = container["resources"]
            if "nvidia.com/gpu" in resources.get("limits", {}):
                # Kubernetes requires extended resources to have requests equal to limits.
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
                gpu_groups.append(group)
        assert gpu_groups, f"{label} has no GPU worker group"
        assert any(group["maxReplicas"] > group["minReplicas"] for group in gpu_groups), label
        # The head only schedules: no tasks or actors compete with the GCS and the dashboard.
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", label


def test_ray_start_params_are_strings() -> None:
    # The CRD types rayStartParams as map[string]string; a YAML number would be rejected by the API server.
    for label, spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for key, value in group["rayStartParams"].items():
                assert isinstance(value, str), (label, key, value)


def test_gpu_workers_get_a_large_shared_memory_volume() -> None:
    for label, spec in cluster_specs():
        for group in spec["workerGroupSpecs"]:
            (container,) = containers(group["template"])
            if "nvidia.com/gpu" not in container["resources"].get("limits", {}):
                continue
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, label
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


# --- commands --------------------------------------------------------------------------------------------------


def test_rayjob_runs_the_embed_entry_point_with_a_mounted_job_file() -> None:
    for job in objects_of_kind("RayJob"):
        module_name, args = parse_python_module_command(shlex.split(job["spec"]["entrypoint"]))
        assert module_name == "jobs.embed"
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        (head_container,) = containers(head)
        config_path = Path(args.config)
        mount = next(m for m in head_container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
        volume = next(v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
        config_map = next(
            c for c in objects_of_kind("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]
        )
        assert config_path.name in config_map["data"]


def test_cronjob_submits_the_backfill_to_the_clusters_head_service() -> None:
    cluster = only("RayCluster")
    namespace = cluster["metadata"]["namespace"]
    cron = only("CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    (container,) = containers(pod)

    submit = parse_ray_job_submit(container["command"])
    address = urlparse(submit["address"])
    assert address.hostname == f"{cluster['metadata']['name']}-head-svc.{namespace}.svc.cluster.local"
    head_ports = {p["name"]: p["containerPort"] for p in containers(cluster["spec"]["headGroupSpec"])[0]["ports"]}
    assert address.port == head_ports["dashboard"]

    module_name, args = parse_python_module_command(list(submit["entrypoint"]))
    assert module_name == "jobs.backfill"
    assert parse_partition_values(args.partitions)  # relative days resolve to real dates
    # The job file travels as the working directory: it must be mounted there as a plain file.
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == f"{submit['working_dir']}/{args.config}")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert mount["subPath"] in config_map_named(volume["configMap"]["name"])["data"]


def test_aws_launcher_config_satisfies_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_documents(AWS_LAUNCHER)[0]
    validate_config(prepare_config(config))
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert node_types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [t for t in node_types.values() if "--gpus all" in t.get("docker", {}).get("worker_run_options", [])]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)


def test_aws_launcher_start_commands_use_real_ray_start_flags() -> None:
    from ray.scripts.scripts import start

    config = load_documents(AWS_LAUNCHER)[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            for part in command.split(";"):
                argv = shlex.split(part)
                if argv[:2] == ["ray", "start"]:
                    params = start.make_context("start", argv[2:]).params
                    assert params["head"] == (key == "head_start_ray_commands")


def test_documented_commands_are_accepted() -> None:
    """Every `python -m jobs...` and `ray job submit` line in the guides parses."""
    checked = 0
    for path in (INFRA / "README.md", REPO / "docs" / "backfill.md"):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.strip().strip("`")
            if line.startswith("ray job submit"):
                params = parse_ray_job_submit(shlex.split(line))
                argv = list(params["entrypoint"])
                if argv[:2] == ["python", "-m"]:
                    parse_python_module_command(argv)
                checked += 1
            elif line.startswith("python -m jobs."):
                parse_python_module_command(shlex.split(line))
                checked += 1
    assert checked >= 3


# --- image -----------------------------------------------------------------------------------------------------


def test_dockerfile_uses_a_cuda_runtime_and_installs_cuda_torch_before_the_project() -> None:
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    base = args["CUDA_IMAGE"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    cuda_version = re.search(r":(\d+)\.(\d+)", base).groups()
    assert args["TORCH_INDEX_URL"].endswith("/cu" + "".join(cuda_version)), "torch wheels must match the CUDA runtime"
    lines = [line.strip() for line in text.splitlines()]
    torch_install = next(i for i, line in enumerate(lines) if "pip install" in line and "TORCH_INDEX_URL" in line)
    project_install = next(i for i, line in enumerate(lines) if re.search(r"pip install \"?/app", line))
    assert torch_install < project_install


def test_dockerfile_smoke_checks_name_real_modules_and_scripts() -> None:
    text = DOCKERFILE.read_text()
    modules = [name.strip() for group in re.findall(r"import ([\w., ]+?)[;\"']", text) for name in group.split(",")]
    assert "jobs.backfill" in modules
    for name in modules:
        if name != "torch":
            assert importlib.util.find_spec(name) is not None, name
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for script in re.findall(r"&& (\S+) --help", text):
        assert script in scripts


def test_docker_context_keeps_what_the_image_installs() -> None:
    patterns = [
        line.strip()
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for needed in [*packages, "pyproject.toml"]:
        for pattern in patterns:
            assert not fnmatch.fnmatch(needed, pattern.rstrip("/")), (needed, pattern)


# --- examples --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(p for p in (REPO / "examples").glob("*.yaml") if p.name != "runtime_env.yaml"), ids=lambda p: p.name
)
def test_example_job_files_load_and_pass_the_dry_run(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.embed import main

    assert main(["--config", str(path), "--dry-run"]) == 0
    assert JobConfig.from_yaml(path).input.uri in capsys.readouterr().out


def test_runtime_env_example_uses_only_known_fields() -> None:
    from ray.runtime_env import RuntimeEnv

    runtime_env = load_documents(REPO / "examples" / "runtime_env.yaml")[0]
    assert set(runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**runtime_env)
