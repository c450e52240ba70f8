"""The cluster files put the model on GPUs: jobs ask for them even while the GPU group is at zero, GPU pods have
the CPUs that decoding for one GPU takes, and the launcher's GPU node type says it brings a GPU."""

from __future__ import annotations

import shlex

import yaml

from pipeline.config import JobConfig
from tests.test_infra_manifests import (
    AWS_LAUNCHER,
    INFRA,
    REPO,
    cluster_specs,
    containers,
    load_documents,
    objects_of_kind,
    parse_ray_job_submit,
)

# Cores that decode and resize 2-12 MP JPEGs to 1008 px for one GPU at 100 images/s (docs/benchmarks.md,
# "Decoding per GPU": 10.4 photos per CPU-second over the mix, full decode), plus one for the model actor.
DECODE_CORES_PER_GPU = 10
ACTOR_CORES = 1


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_job_files_on_the_clusters_ask_for_gpus_explicitly() -> None:
    """A GPU group at zero shows no GPU at submission; without the setting the run would be refused."""
    for config_map in objects_of_kind("ConfigMap"):
        for key, text in config_map["data"].items():
            config = JobConfig.from_dict(yaml.safe_load(text))
            assert config.compute.gpus_per_actor == 1, (config_map["metadata"]["name"], key)


def test_job_files_the_guide_submits_to_the_cluster_ask_for_gpus() -> None:
    submitted = []
    for line in (INFRA / "README.md").read_text().splitlines():
        line = line.strip().strip("`")
        if line.startswith("ray job submit"):
            argv = list(parse_ray_job_submit(shlex.split(line))["entrypoint"])
            submitted.append(argv[argv.index("--config") + 1])
    assert submitted
    for path in submitted:
        assert JobConfig.from_yaml(REPO / path).compute.gpus_per_actor == 1, path


def test_gpu_pods_have_the_cpus_one_gpu_needs_to_stay_fed() -> None:
    for label, spec in cluster_specs():
        for group in spec["workerGroupSpecs"]:
            (container,) = containers(group["template"])
            limits = container["resources"]["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            if gpus:
                assert cpus(limits["cpu"]) / gpus >= DECODE_CORES_PER_GPU + ACTOR_CORES, (label, group["groupName"])


def test_the_launchers_gpu_node_type_declares_its_gpu_and_cpus() -> None:
    config = load_documents(AWS_LAUNCHER)[0]
    gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu_types, "no node type declares GPU: the autoscaler learns of it only once such a node is up"
    for node_type in gpu_types:
        assert node_type["resources"]["CPU"] >= 1 and node_type["max_workers"] > node_type["min_workers"]
    # with the CPU nodes, the cluster at its largest has the decoding cores its GPUs need
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    cores = sum(t["resources"]["CPU"] * t["max_workers"] for t in workers)
    gpus = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in workers)
    assert cores >= gpus * (DECODE_CORES_PER_GPU + ACTOR_CORES)


def test_docs_give_the_ratio_the_manifests_use() -> None:
    text = (REPO / "docs" / "benchmarks.md").read_text()
    assert "## Decoding per GPU" in text
    assert f"{DECODE_CORES_PER_GPU} cores per GPU" in text
