"""The reading examples in docs/schema.md, run against a real output (pyarrow, DuckDB, polars)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline import JobConfig, run_job

DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
PLACEHOLDER = "/data/embeddings"


def _python_blocks() -> dict[str, str]:
    """Each ```python block, keyed by the heading it sits under (headings inside code blocks do not count)."""
    blocks: dict[str, str] = {}
    heading, code, count = "", None, 0
    for line in DOC.read_text().splitlines(keepends=True):
        if code is None and line.startswith("```python"):
            code = []
        elif code is not None and line.startswith("```"):
            blocks[f"{heading} {count}"] = "".join(code)
            code, count = None, count + 1
        elif code is not None:
            code.append(line)
        elif line.startswith("#"):
            heading, count = line.lstrip("#").strip(), 0
    return blocks


@pytest.fixture(scope="module")
def output(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    rows = []
    for i in range(6):
        path = root / f"img{i}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue())
        rows.append({"id": f"img{i}", "image": str(path), "caption": f"picture {i}", "split": ["train", "val"][i % 2]})
    rows.append({"id": "broken", "image": str(root / "missing.jpg"), "caption": None, "split": "val"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = JobConfig.from_dict(
        {
            "input": {"uri": str(root / "manifest.jsonl")},
            "output": {
                "uri": str(root / "out"),
                "partition_by": ["split"],
                "features": ["image_embedding", "text_embedding", "vision_features"],
            },
            "model": {"config": "tiny", "imgsz": 56, "random_weights": True},
        }
    )
    run_job(config)
    return root / "out"


def test_every_example_is_collected() -> None:
    assert sorted(_python_blocks()) == ["DuckDB 0", "Ray Data 0", "Reading 0", "polars 0", "pyarrow 0"]


def _run(block: str, output: Path) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(_python_blocks()[block].replace(PLACEHOLDER, str(output)), block, "exec"), namespace)
    return namespace


@pytest.mark.timeout(120)
def test_package_reader_example(output: Path) -> None:
    ns = _run("Reading 0", output)
    assert ns["table"].num_rows == 3 and set(ns["table"].column("split").to_pylist()) == {"train"}
    assert ns["vectors"].shape == (6, 32) and ns["nearest"][0] == ns["ids"][0]


@pytest.mark.timeout(120)
def test_pyarrow_example(output: Path) -> None:
    ns = _run("pyarrow 0", output)
    assert ns["vectors"].shape == (6, 32) and ns["dense"].shape == (6, 32, 4, 4)
    assert ns["run"]["image_size"] == 56


@pytest.mark.timeout(120)
def test_ray_data_example(output: Path) -> None:
    ns = _run("Ray Data 0", output)
    assert ns["vectors"].shape == (6, 32) and ns["dense"].shape == (6, 32, 4, 4)


@pytest.mark.timeout(120)
def test_duckdb_example(output: Path) -> None:
    ns = _run("DuckDB 0", output)
    assert ns["nearest"][0][2] == pytest.approx(1.0, abs=1e-3)
    assert [row[0] for row in ns["errors"]] == ["broken"]


@pytest.mark.timeout(120)
def test_polars_example(output: Path) -> None:
    ns = _run("polars 0", output)
    assert ns["vectors"].shape == (6, 32) and ns["vectors"].dtype == np.float16
    assert ns["dense"].shape == (6, 32, 4, 4)
    assert sorted(ns["per_split"].rows()) == [("train", 3), ("val", 3)]
