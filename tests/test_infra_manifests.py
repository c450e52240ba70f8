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
from packaging.specifiers import SpecifierSet

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


RAY_OBJECT_STORE_SHARE = 0.3  # Ray's default object store: 30% of the node's memory (ray_constants)


def quantity_bytes(text: str) -> float:
    """A Kubernetes memory quantity (`16Gi`, `512Mi`, `4G`) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]i?)?", str(text)).groups()
    return float(number) * (units[unit] if unit else 1)


def test_shared_memory_holds_rays_object_store_or_is_left_to_kuberay() -> None:
    """Ray puts its object store in /dev/shm when it is large enough, else in /tmp (slow, a warning). KubeRay
    mounts a memory-backed /dev/shm sized to the container's memory when a group mounts none
    (`addEmptyDir` in ray-operator/controllers/ray/common/pod.go, 1.0 through 1.7); one mounted by hand must
    hold the default object store, 30% of the memory limit."""
    for label, spec in cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            (container,) = containers(group["template"])
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if "/dev/shm" not in mounts:
                continue
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            empty_dir = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert empty_dir["medium"] == "Memory", (label, group.get("groupName", "head"))
            memory = quantity_bytes(container["resources"]["limits"]["memory"])
            store = quantity_bytes(group["rayStartParams"].get("object-store-memory", RAY_OBJECT_STORE_SHARE * memory))
            assert quantity_bytes(empty_dir.get("sizeLimit", container["resources"]["limits"]["memory"])) >= store, (
                label,
                group.get("groupName", "head"),
                "a /dev/shm smaller than Ray's object store: drop the mount and let KubeRay size it",
            )


def test_a_rayjob_releases_its_gpus_soon_after_the_job() -> None:
    """`shutdownAfterJobFinishes` deletes the cluster only after `ttlSecondsAfterFinished`; meanwhile a GPU group
    held at `minReplicas > 0` keeps its GPUs. The job's logs stay with the submitter, which outlives the cluster."""
    for job in objects_of_kind("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec.get("ttlSecondsAfterFinished", 0) <= 300, spec.get("ttlSecondsAfterFinished")
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            (container,) = containers(group["template"])
            if "nvidia.com/gpu" in container["resources"].get("limits", {}):
                assert group["minReplicas"] == 0, group["groupName"]


# --- schemas: KubeRay's CRDs and Kubernetes' own -----------------------------------------------------------------

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest the manifests are meant for
KUBERAY_SCHEMAS = REPO / "tests" / "data" / "kuberay"


def strict(schema: Any) -> Any:
    """An openAPIV3Schema where unknown fields are errors, as `kubectl apply --validate=strict` makes them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def kuberay_validator(kind: str) -> Any:
    import gzip
    import json

    import jsonschema

    schema = json.loads(gzip.decompress((KUBERAY_SCHEMAS / f"{kind.lower()}.v1.schema.json.gz").read_bytes()))
    return jsonschema.Draft7Validator(strict(schema))


def schema_errors(validator: Any, document: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_objects_satisfy_the_kuberay_crd_schema(kind: str) -> None:
    documents = objects_of_kind(kind)
    assert documents
    validator = kuberay_validator(kind)
    for document in documents:
        assert document["apiVersion"] == "ray.io/v1"
        assert schema_errors(validator, document) == [], document["metadata"]["name"]


def test_the_crd_schema_check_catches_a_misspelled_or_mistyped_field() -> None:
    import copy

    cluster = copy.deepcopy(only("RayCluster"))
    validator = kuberay_validator("RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 0  # the real field is minReplicas
    cluster["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "16"  # an integer field
    errors = schema_errors(validator, cluster)
    assert any("'minReplica' was unexpected" in e for e in errors), errors
    assert any(e.startswith("spec.workerGroupSpecs.1.maxReplicas") for e in errors), errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_satisfy_the_kubernetes_schemas(version: str) -> None:
    """Every built-in object (and every pod template, also those inside KubeRay objects) against the Kubernetes
    JSON schemas that the `kubernetes-validate` package bundles, strictly (unknown fields are errors)."""
    import kubernetes_validate

    checked = 0
    for path, document in kubernetes_objects():
        if document["apiVersion"].startswith("ray.io/"):
            templates = [m["template"] for m in walk(document["spec"]) if isinstance(m.get("template"), dict)]
            templates += (
                [document["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in document["spec"] else []
            )
            for template in templates:
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                kubernetes_validate.validate(pod, version, strict=True)
                checked += 1
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{path.name}: {document['kind']} {document['metadata']['name']}: {error}") from error
        checked += 1
    assert checked >= 10


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


# The CUDA major version of PyPI's Linux torch wheels, from each release's metadata (torch 2.13.0 requires
# cuda-toolkit==13.0.3). A torch bump must look it up again: the base image's CUDA has to match.
PYPI_TORCH_CUDA_MAJOR = {"2.13": "13"}
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}  # the distribution's python3, which the image's venv uses


def torch_version_under_test() -> str:
    """The torch CI installs (`.ci/run`), which is the version everything is tested with."""
    return re.search(r"pip install torch==(\S+)", (REPO / ".ci" / "run").read_text()).group(1)


def test_dockerfile_pins_the_versions_the_project_is_tested_with() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    args = dockerfile_args()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(r).name: Requirement(r) for r in pyproject["dependencies"]}
    torch_version = args["TORCH_VERSION"]
    assert torch_version == torch_version_under_test(), "the image must run the torch the tests run"
    assert requirements["torch"].specifier.contains(torch_version)
    assert f"torch=={torch_version}" in (REPO / "README.md").read_text()
    # the image's Python (Ubuntu's python3) is one the project supports
    ubuntu = re.search(r"ubuntu(\d+\.\d+)", args["CUDA_IMAGE"]).group(1)
    assert Version(UBUNTU_PYTHON[ubuntu]) in SpecifierSet(pyproject["requires-python"])


def test_dockerfile_installs_a_cuda_torch_matching_the_base_image_before_the_project() -> None:
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    base = args["CUDA_IMAGE"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    cuda_major, cuda_minor = re.search(r":(\d+)\.(\d+)", base).groups()
    index = args["TORCH_INDEX_URL"]
    if index.rstrip("/") == "https://pypi.org/simple":
        torch_minor = ".".join(args["TORCH_VERSION"].split(".")[:2])
        assert PYPI_TORCH_CUDA_MAJOR[torch_minor] == cuda_major, "PyPI's torch wheels must match the CUDA runtime"
    else:
        assert index.endswith(f"/cu{cuda_major}{cuda_minor}"), "torch wheels must match the CUDA runtime"
    lines = [line.strip() for line in text.splitlines()]
    torch_install = next(i for i, line in enumerate(lines) if "pip install" in line and "TORCH_INDEX_URL" in line)
    project_install = next(i for i, line in enumerate(lines) if re.search(r"pip install \"?/app", line))
    assert torch_install < project_install


def test_dockerfile_installs_a_compiler_and_the_headers_of_its_python_for_triton() -> None:
    """Triton builds a C helper against Python.h when it first compiles a kernel: without gcc and the headers of
    the image's own python3, `torch.compile` fails on the GPU workers at run time, not at build time."""
    text = DOCKERFILE.read_text()
    packages = set(re.findall(r"[\w.+-]+", text[text.index("apt-get install") : text.index("rm -rf /var/lib/apt")]))
    assert {"gcc", "libc6-dev", "python3-dev", "python3"} <= packages
    # the build itself compiles a file that includes Python.h with the interpreter's include path
    assert "#include <Python.h>" in text and "sysconfig.get_paths()" in text


def dockerfile_run(marker: str) -> str:
    """The shell text of the Dockerfile's RUN instruction containing `marker` (continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (command,) = [line[4:] for line in text.splitlines() if line.startswith("RUN ") and marker in line]
    return command


@pytest.mark.timeout(60)
@pytest.mark.parametrize("base_has_uid_1000", [True, False], ids=["ubuntu-24.04", "no-uid-1000"])
def test_dockerfile_user_step_works_on_a_base_that_already_has_uid_1000(
    tmp_path: Path, base_has_uid_1000: bool
) -> None:
    """Runs the Dockerfile's user step for real against the accounts of an Ubuntu 24.04 base (`ubuntu`, uid 1000)
    and of a base without uid 1000, in a private mount namespace over copies of /etc and /home (needs root)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("usermod") is None:
        pytest.skip("needs root, unshare and the shadow utilities (runs the step in a private mount namespace)")
    etc, home = tmp_path / "etc", tmp_path / "home"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    home.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        path = etc / name
        lines = path.read_text().splitlines() if path.exists() else []
        ids = {"passwd": 2, "group": 2}
        kept = [line for line in lines if not (name in ids and line.split(":")[ids[name]] == "1000")]
        kept = [line for line in kept if line.split(":")[0] not in {"ubuntu", "ray"} and line]
        if base_has_uid_1000:
            kept.append(
                {
                    "passwd": "ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash",
                    "group": "ubuntu:x:1000:",
                    "shadow": "ubuntu:!:19000:0:99999:7:::",
                    "gshadow": "ubuntu:!::",
                }[name]
            )
        path.write_text("\n".join(kept) + "\n")
    if base_has_uid_1000:
        (home / "ubuntu").mkdir()
        (home / "ubuntu" / ".profile").write_text("# ubuntu's\n")
    step = dockerfile_run("--uid 1000")
    script = f"set -e; mount --bind {etc} /etc; mount --bind {home} /home; {step}"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HF_HOME": "/home/ray/.cache/huggingface"},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":") for line in (etc / "group").read_text().splitlines()}
    assert passwd["ray"][2:4] == ["1000", "1000"] and passwd["ray"][5:7] == ["/home/ray", "/bin/bash"]
    assert group["ray"][2] == "1000" and "ubuntu" not in passwd and "ubuntu" not in group
    cache = home / "ray" / ".cache" / "huggingface"
    assert cache.is_dir() and cache.stat().st_uid == 1000 and (home / "ray").stat().st_uid == 1000
    assert not (home / "ubuntu").exists()


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
