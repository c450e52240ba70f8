"""Write the `v1` openAPIV3Schema of KubeRay's RayCluster and RayJob CRDs to `tests/data/kuberay/`.

The infra tests validate `infra/kuberay/*.yaml` against these schemas (no network, no cluster). No PyPI package
carries KubeRay's CRDs, so they are taken from a checkout of https://github.com/ray-project/kuberay at a release
tag (the files `ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml`) and stored as sorted, compact
JSON, gzipped; the source (tag and commit) goes into `tests/data/kuberay/SOURCE.json`.

    git clone --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python tools/vendor_kuberay_crds.py /tmp/kuberay v1.7.0
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CRD_DIR = "ray-operator/config/crd/bases"


def main(checkout: str, tag: str) -> None:
    repo = Path(checkout)
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", f"{tag}^{{commit}}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, name in CRDS.items():
        text = subprocess.run(
            ["git", "-C", str(repo), "show", f"{commit}:{CRD_DIR}/{name}"], capture_output=True, text=True, check=True
        ).stdout
        crd = yaml.safe_load(text)
        assert crd["spec"]["names"]["kind"] == kind, name
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = json.dumps(version["schema"]["openAPIV3Schema"], sort_keys=True, separators=(",", ":"))
        # mtime=0: the same CRD gives the same bytes
        (OUT / f"{kind.lower()}.v1.schema.json.gz").write_bytes(gzip.compress(schema.encode(), 9, mtime=0))
    source = {
        "repository": "https://github.com/ray-project/kuberay",
        "tag": tag,
        "commit": commit,
        "files": [f"{CRD_DIR}/{name}" for name in CRDS.values()],
        "taken": "spec.versions[name=v1].schema.openAPIV3Schema",
    }
    (OUT / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
