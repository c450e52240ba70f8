"""The entry points' command lines: parsing, config loading and overrides, usage errors, the backfill dry run.

None of these start Ray: bad input is refused before any work begins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import backfill, embed, exit_codes
from jobs.job_config import apply_overrides, load_job_config, parse_override
from pipeline.backfill.commit import commit_partition
from pipeline.backfill.lease import PartitionLease
from pipeline.storage import Location


def write_job(tmp_path: Path, **data: object) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_parsed_as_yaml_into_sections() -> None:
    assert parse_override("compute.num_actors=4") == (["compute", "num_actors"], 4)
    assert parse_override("output.features=[image_embedding]") == (["output", "features"], ["image_embedding"])
    data = apply_overrides({"output": {"uri": "a"}}, ["output.uri=s3://b/out", "resume_path=s3://b/ckpt"])
    assert data == {"output": {"uri": "s3://b/out"}, "resume_path": "s3://b/ckpt"}
    with pytest.raises(ValueError):
        parse_override("no-equals-sign")
    with pytest.raises(ValueError):
        apply_overrides({"run_id": "x"}, ["run_id.deeper=1"])


def test_load_applies_overrides_and_rejects_unknown_keys(tmp_path: Path) -> None:
    path = write_job(tmp_path, input={"uri": "s3://b/in"}, output={"uri": "s3://b/out"})
    config = load_job_config(str(path), ["compute.batch_size=3", "model.config=tiny"])
    assert (config.compute.batch_size, config.model.config, config.input.uri) == (3, "tiny", "s3://b/in")
    with pytest.raises(ValueError, match="unknown"):
        load_job_config(str(path), ["compute.batchsize=3"])


def test_embed_dry_run_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_job(tmp_path, input={"uri": "s3://b/in"}, output={"uri": "s3://b/out"})
    code = embed.main(["--config", str(path), "--run-id", "nightly-1", "--resume-path", "s3://b/ckpt", "--dry-run"])
    assert code == exit_codes.OK
    printed = json.loads(capsys.readouterr().out)
    assert (printed["run_id"], printed["resume_path"]) == ("nightly-1", "s3://b/ckpt")


@pytest.mark.parametrize(
    "content",
    ["input: [not, a, mapping]\n", "bogus_section: {}\n", "- a list\n", "input: {uri: x, colour: red}\n"],
)
def test_embed_refuses_a_bad_job_file_with_the_usage_code(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert embed.main(["--config", str(path)]) == exit_codes.USAGE
    assert "cannot load job config" in capsys.readouterr().err


def test_embed_refuses_a_missing_job_file(tmp_path: Path) -> None:
    assert embed.main(["--config", str(tmp_path / "absent.yaml")]) == exit_codes.USAGE


def test_parsers_refuse_abbreviated_and_unknown_flags() -> None:
    with pytest.raises(SystemExit) as exited:
        backfill.build_parser().parse_args(["--config", "x", "--partition-col", "date"])
    assert exited.value.code == exit_codes.USAGE
    with pytest.raises(SystemExit):
        embed.build_parser().parse_args(["--config", "x", "--colour"])
    with pytest.raises(SystemExit):
        backfill.build_parser().parse_args(["--config", "x", "--partition-column", "da/te"])
    with pytest.raises(SystemExit):
        backfill.build_parser().parse_args(["--config", "x", "--partition-column", "date", "--lease-ttl", "0"])


def test_backfill_refuses_bad_partitions_and_empty_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    path = write_job(tmp_path, input={"uri": str(tmp_path / "in")}, output={"uri": str(tmp_path / "out")})
    base = ["--config", str(path), "--partition-column", "date"]
    assert backfill.main([*base, "--partitions", "2025-01-07..2025-01-01"]) == exit_codes.USAGE
    assert "empty" in capsys.readouterr().err
    assert backfill.main(base) == exit_codes.USAGE  # nothing to discover
    assert "no date=... partitions" in capsys.readouterr().err
    # The backfill writes one directory per partition itself; partitioning the output by it again is refused.
    assert backfill.main([*base, "--partitions", "a", "--set", "output.partition_by=[date]"]) == exit_codes.USAGE


def test_backfill_dry_run_shows_each_partition_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for day in ("2025-01-01", "2025-01-02", "2025-01-03"):
        (tmp_path / "in" / f"date={day}").mkdir(parents=True)
        (tmp_path / "in" / f"date={day}" / "manifest.csv").write_text("image\nx.jpg\n")
    output = Location.parse(str(tmp_path / "out"))
    staged = output.join("_staging", "date=2025-01-01", "data")
    staged.fs.makedirs(staged.path, exist_ok=True)
    pq.write_table(pa.table({"id": ["a"]}), staged.join("part-0.parquet").path)
    commit_partition(staged, output.join("date=2025-01-01"), partition={"date": "2025-01-01"}, run_id="earlier")
    assert PartitionLease(output.join("_locks", "date=2025-01-02"), owner="someone-else").try_acquire()

    path = write_job(tmp_path, input={"uri": str(tmp_path / "in")}, output={"uri": output.uri})
    assert backfill.main(["--config", str(path), "--partition-column", "date", "--dry-run"]) == exit_codes.OK
    lines = capsys.readouterr().out.strip().splitlines()
    states = {line.split("\t")[0]: line.split("\t")[1] for line in lines}
    assert states == {"date=2025-01-01": "skipped", "date=2025-01-02": "busy", "date=2025-01-03": "pending"}
    assert "someone-else" in lines[1]


def test_embed_refuses_to_run_without_a_checkpoint_unless_random_weights_are_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.csv").write_text(f"image\n{tmp_path / 'a.jpg'}\n")
    path = write_job(tmp_path, input={"uri": str(tmp_path / "m.csv")}, output={"uri": str(tmp_path / "out")})
    assert embed.main(["--config", str(path)]) == exit_codes.USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint: pass --checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert embed.main(["--config", str(path), "--random-weights", "--dry-run"]) == exit_codes.OK
    assert json.loads(capsys.readouterr().out)["model"]["random_weights"] is True


def test_backfill_refuses_a_bad_checkpoint_before_any_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in" / "date=2025-01-01").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not weights\n")
    path = write_job(
        tmp_path,
        input={"uri": str(tmp_path / "in")},
        output={"uri": str(tmp_path / "out")},
        model={"checkpoint": str(tmp_path / "notes.txt")},
    )
    assert backfill.main(["--config", str(path), "--partition-column", "date"]) == exit_codes.USAGE
    assert "is not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_exit_codes_map_every_outcome() -> None:
    from pipeline.run.outcome import Outcome, run_outcome

    assert {exit_codes.exit_code(outcome) for outcome in Outcome} == {0, 1, 2, 3, 4, 130}
    assert run_outcome({"rows_total": 100, "rows_error": 5}, 0.05) is Outcome.OK
    assert run_outcome({"rows_total": 100, "rows_error": 6}, 0.05) is Outcome.ERROR_ROWS_OVER_BUDGET
    assert run_outcome({"rows_total": 10, "rows_error": 1}, 0.0) is Outcome.ERROR_ROWS_OVER_BUDGET
    assert run_outcome({"rows_total": 0, "rows_error": 0}, 0.0) is Outcome.OK


def test_backfill_applies_the_error_budget_per_partition() -> None:
    from pipeline.backfill.runner import BackfillReport, PartitionResult, render_report
    from pipeline.run.outcome import Outcome

    report = BackfillReport(run_id="r", output="s3://b/o", column="date", started_at=0.0, max_error_fraction=0.05)
    report.results = [
        PartitionResult("2025-01-01", "committed", rows=1000, error_rows=3),  # 0.3%: a few broken JPEGs
        PartitionResult("2025-01-02", "skipped", rows=10),
    ]
    assert report.outcome() is Outcome.OK
    report.results.append(PartitionResult("2025-01-03", "committed", rows=100, error_rows=100))  # all broken
    assert report.outcome() is Outcome.ERROR_ROWS_OVER_BUDGET
    assert "1 above the error budget of 5.00% (2025-01-03)" in render_report(report)
    assert report.to_dict()["outcome"] == "error rows over budget"


def test_duplicate_ids_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"key": k, "image": f"/photos/{i}.jpg"} for i, k in enumerate(["a", "b", "a", "c", "b", "d", "e", "e", "f"])
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    path = write_job(
        tmp_path,
        input={"uri": str(tmp_path / "manifest.parquet"), "id_column": "key"},
        output={"uri": str(tmp_path / "out")},
        model={"config": "tiny", "imgsz": 56, "random_weights": True},
    )
    assert embed.main(["--config", str(path)]) == exit_codes.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "3 ids occur more than once in the manifest's column 'key': 'a', 'b', 'e'" in err[0]
    assert "--id-column" in err[0]
    assert not (tmp_path / "out").exists()


def test_repeated_images_without_ids_are_refused_and_distinct_captions_are_not(tmp_path: Path) -> None:
    from pipeline.config import JobConfig
    from pipeline.input.duplicate_ids import check_unique_ids

    lines = [
        {"image": "s3://b/1.jpg", "caption": "one"},
        {"image": "s3://b/1.jpg", "caption": "another caption: another row"},
        {"image": "s3://b/2.jpg", "caption": None},
        {"image": " s3://b/2.jpg ", "caption": ""},  # the same image, the same (absent) caption
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    # the columns as preflight resolves them before it calls the check
    columns = {"id_column": "id", "image_column": "image", "caption_column": "caption"}
    config = JobConfig.from_dict({"input": {"uri": str(manifest), **columns}, "output": {"uri": str(tmp_path / "out")}})
    with pytest.raises(ValueError, match=r"1 images are listed more than once .*'s3://b/2.jpg'.*--id-column"):
        check_unique_ids(config)
    manifest.write_text("\n".join(json.dumps(line) for line in lines[:3]))
    check_unique_ids(config)
    # Rows with an id column: only given ids count, null ids derive from the image.
    manifest.write_text("id,image\n1,/x.jpg\n,/y.jpg\n,/z.jpg\n2,/x.jpg\n")
    csv = tmp_path / "m.csv"
    csv.write_text(manifest.read_text())
    manifest.unlink()
    check_unique_ids(
        JobConfig.from_dict({"input": {"uri": str(csv), **columns, "caption_column": None}, "output": {"uri": "o"}})
    )


def test_summary_shows_the_steady_rate_beside_the_whole_run_rate(tmp_path: Path) -> None:
    config = load_job_config(write_job(tmp_path, input={"uri": "in.jsonl"}, output={"uri": "out"}), [])
    summary = {"rows_total": 48, "rows_error": 0, "elapsed_s": 100.0, "rows_per_s": 0.48, "steady_rows_per_s": 0.81}
    assert "100.0s, 0.48 rows/s (0.81 rows/s after the first batch)" in embed.render_summary(config, summary, 0)
    del summary["steady_rows_per_s"]  # one batch, or a summary written by an older version
    assert "100.0s, 0.48 rows/s\n" in embed.render_summary(config, summary, 0)
