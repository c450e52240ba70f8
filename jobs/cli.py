"""`sam3-embed`: the command line (`run`, `demo`, `inspect`, `compile`).

`run` is `python -m jobs.embed` with flags for the common settings: a job file is optional, and every flag
overrides the file. Ray is the cluster in RAY_ADDRESS when set, otherwise a local cluster started in-process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from jobs import exit_codes
from jobs.cli_common import configure_logging
from jobs.compile_command import add_parser as add_compile_parser
from jobs.compile_command import compile_command
from jobs.embed import add_dataset_arguments, apply_dataset_arguments, execute
from jobs.job_config import apply_overrides, read_config_data
from pipeline.config import JobConfig

# flag -> (config path, parser for the flag's text)
RUN_FLAGS: dict[str, tuple[str, Any]] = {
    "input": ("input.uri", str),
    "format": ("input.format", str),
    "id_column": ("input.id_column", str),
    "image_column": ("input.image_column", str),
    "caption_column": ("input.caption_column", str),
    "captions_column": ("input.captions_column", str),
    "output": ("output.uri", str),
    "checkpoint": ("model.checkpoint", str),
    "model_config": ("model.config", str),
    "imgsz": ("model.imgsz", int),
    "dtype": ("model.dtype", str),
    "partition_by": ("output.partition_by", lambda text: [c.strip() for c in text.split(",") if c.strip()]),
    "features": ("output.features", lambda text: [c.strip() for c in text.split(",") if c.strip()]),
    "max_error_fraction": ("output.max_error_fraction", float),
    "batch_size": ("compute.batch_size", int),
    "num_actors": ("compute.num_actors", int),
    "s3_endpoint_url": ("s3.endpoint_url", str),
    "resume_path": ("resume_path", str),
    "run_id": ("run_id", str),
}
DEMO_IMGSZ = {"tiny": 224, "tiny-sam3.1": 224}  # others (sam3, sam3.1, auto): 1008
MODEL_CONFIGS = ["auto", "sam3", "sam3.1", "tiny", "tiny-sam3.1"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3-embed",
        allow_abbrev=False,
        description="Batch embedding of images and captions with SAM 3's vision-language backbone, on Ray.",
        epilog=exit_codes.RUN_EPILOG,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and Ray's own progress blocks and log lines"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", allow_abbrev=False, help="run an embedding job (job file and/or flags)")
    run.add_argument("--config", metavar="PATH_OR_URI", help="job file (YAML); flags below override it")
    run.add_argument("--input", metavar="URI", help="manifest file or prefix, image prefix, or WebDataset shards")
    run.add_argument("--format", choices=["manifest", "images", "webdataset"], help="default: manifest")
    run.add_argument("--id-column", metavar="NAME", help="manifest column of row ids (default: recognised)")
    run.add_argument("--image-column", metavar="NAME", help="manifest column of images (default: recognised)")
    run.add_argument("--caption-column", metavar="NAME", help="column of one caption per row ('' for none)")
    run.add_argument("--captions-column", metavar="NAME", help="column of several captions per row (lists)")
    run.add_argument("--output", metavar="URI", help="where the Parquet dataset goes")
    run.add_argument(
        "--checkpoint", metavar="PATH_OR_URI", help="sam3.pt, sam3.1_multiplex.pt, *.safetensors (or hf://...)"
    )
    run.add_argument(
        "--random-weights", action="store_true", help="run without a checkpoint, on random weights (tests, demos)"
    )
    run.add_argument(
        "--model-config", choices=MODEL_CONFIGS, help="default auto: sam3 or sam3.1, as the checkpoint's keys say"
    )
    run.add_argument("--imgsz", type=int, help="square input size, a multiple of 14 (default 1008)")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    run.add_argument("--partition-by", metavar="COL[,COL]", help="hive partition columns of the output")
    run.add_argument("--features", metavar="NAME[,NAME]", help="features to store (see docs/schema.md)")
    run.add_argument(
        "--max-error-fraction", type=float, metavar="F", help="error rows allowed before exit 3 (default 0.05)"
    )
    run.add_argument("--batch-size", type=int)
    run.add_argument("--num-actors", type=int, help="model actors (one GPU each when the cluster has GPUs)")
    run.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint (MinIO, moto, …)")
    run.add_argument("--resume-path", metavar="URI", help="checkpoint location: a rerun skips finished rows")
    run.add_argument("--run-id")
    add_dataset_arguments(run)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--report", metavar="PATH_OR_URI", help="also write the run summary as JSON here")

    demo = commands.add_parser("demo", allow_abbrev=False, help="embed a generated sample dataset locally")
    demo.add_argument("--output", default="demo-output", metavar="DIR", help="folder for images and Parquet")
    demo.add_argument("--checkpoint", metavar="PATH_OR_URI", help="real weights: sam3.pt or model.safetensors")
    demo.add_argument(
        "--model-config", choices=MODEL_CONFIGS, help="default: auto with a --checkpoint, else tiny (random weights)"
    )
    demo.add_argument("--imgsz", type=int, help="default: 224 for tiny, 1008 for sam3")

    add_compile_parser(commands)

    inspect = commands.add_parser("inspect", allow_abbrev=False, help="describe an output dataset")
    inspect.add_argument("output", metavar="OUTPUT", help="output URI of a run")
    inspect.add_argument("--rows", type=int, default=3, help="how many rows to show")
    inspect.add_argument("--s3-endpoint-url", metavar="URL")
    return parser


def run_command(args: argparse.Namespace) -> int:
    try:
        data = read_config_data(args.config) if args.config else {}
        overrides = [
            f"{path}={json.dumps(parse(getattr(args, flag)))}"
            for flag, (path, parse) in RUN_FLAGS.items()
            if getattr(args, flag) is not None
        ]
        if args.random_weights:
            overrides.append("model.random_weights=true")
        config = JobConfig.from_dict(apply_overrides(data, overrides + args.overrides))
        apply_dataset_arguments(config, args)
    except (OSError, ValueError, TypeError) as error:
        print(f"error: cannot build the job config: {error}", file=sys.stderr)
        return exit_codes.USAGE
    return execute(config, report=args.report, verbose=args.verbose)


def demo_command(args: argparse.Namespace) -> int:
    from pipeline.run.demo import write_sample_dataset

    root = Path(args.output).resolve()
    dataset = write_sample_dataset(root / "data")
    embeddings = root / "embeddings"
    # the demo owns this folder; a fresh output each time keeps reruns simple
    shutil.rmtree(embeddings, ignore_errors=True)
    model_config = args.model_config or ("auto" if args.checkpoint else "tiny")
    imgsz = args.imgsz or DEMO_IMGSZ.get(model_config, 1008)
    config = JobConfig.from_dict(
        {
            "input": {"uri": str(dataset.manifest), "format": "manifest"},
            "output": {"uri": str(embeddings), "partition_by": ["split"]},
            "model": {
                "checkpoint": args.checkpoint,
                "random_weights": args.checkpoint is None,
                "config": model_config,
                "imgsz": imgsz,
            },
            "compute": {"batch_size": 4},
        }
    )
    print(f"sample dataset: {len(dataset.samples)} images with captions in {dataset.images_dir}")
    if args.checkpoint is None:
        print(
            f"NOTE: no --checkpoint given, so the {model_config!r} model has RANDOM weights: the pipeline "
            "runs for real, but the embeddings mean nothing. Pass --checkpoint sam3.pt for real features."
        )
    code = execute(config, verbose=args.verbose)
    if code in (exit_codes.OK, exit_codes.FINISHED_WITH_ERROR_ROWS):
        print()
        inspect_output(str(embeddings), rows=3)
    return code


def inspect_command(args: argparse.Namespace) -> int:
    options = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else None
    try:
        inspect_output(args.output, rows=args.rows, storage_options=options)
    except (OSError, ValueError) as error:
        print(f"error: cannot read {args.output}: {error}", file=sys.stderr)
        return exit_codes.USAGE
    return exit_codes.OK


def inspect_output(uri: str, rows: int, storage_options: dict[str, Any] | None = None) -> None:
    """What an output holds, reading only the status column and the first rows, never the whole dataset."""
    import pyarrow.dataset as ds

    from pipeline.dataset.reader import open_embeddings, read_run_metadata

    dataset = open_embeddings(uri, storage_options=storage_options)  # FileNotFoundError when nothing is committed
    files = dataset.files
    total = dataset.count_rows()
    errors = dataset.count_rows(filter=ds.field("status") == "error")
    print(f"output:     {uri}")
    print(f"files:      {len(files)}")
    print(f"rows:       {total} ({total - errors} ok, {errors} error)")
    partitions = sorted({"/".join(p for p in Path(f).parent.parts if "=" in p) for f in files} - {""})
    if partitions:
        print(f"partitions: {', '.join(partitions)}")
    print("schema:")
    for field in dataset.schema:
        print(f"  {field.name}: {field.type}")
    print_feature_sizes(dataset)
    run = read_run_metadata(uri, storage_options=storage_options)
    metadata, summary = run["metadata"], run["summary"]
    if metadata:
        model = metadata.get("model", {})
        print(
            f"model:      {model.get('config')} at {metadata.get('image_size')} px, "
            f"checkpoint {model.get('checkpoint') or 'none (random weights)'}, "
            f"sha256 {model.get('checkpoint_sha256') or '-'}, run {metadata.get('run_id')}"
        )
    if summary:
        rate = summary.get("rows_per_s")
        print(f"summary:    {summary.get('rows_ok')} ok, {summary.get('rows_error')} error, {rate} rows/s")
    shown = dataset.head(rows).to_pylist()
    print(f"first {len(shown)} rows:")
    for row in shown:
        embedding = row.get("image_embedding")
        vector = f"[{', '.join(f'{v:.3f}' for v in embedding[:4])}, …] ({len(embedding)} dims)" if embedding else None
        text = row.get("caption", row.get("captions"))
        print(f"  {row['id']}: status={row['status']} caption={text!r} image_embedding={vector}")
        print(f"      source_uri: {row.get('source_uri')}")
        if row.get("error"):
            print(f"      error: {row['error']}")
    if errors:
        columns = [name for name in ("id", "source_uri", "error") if name in dataset.schema.names]
        failed = dataset.scanner(columns=columns, filter=ds.field("status") == "error").head(rows).to_pylist()
        print(f"{errors} rows have status=error; the first {len(failed)}:")
        for row in failed:
            print(f"  {row['id']}: {row.get('source_uri')}")
            print(f"      error: {row.get('error')}")


def print_feature_sizes(dataset: Any) -> None:
    from pipeline.dataset.sizes import feature_sizes

    sizes = feature_sizes(dataset)
    if sizes:
        print("per row (raw; in the files, zstd, over the first files):")
    for size in sizes:
        shape = "x".join(str(d) for d in size.shape)
        print(f"  {size.name}: [{shape}] {size.dtype}, {size.raw_bytes:,} B; {size.stored_bytes:,.0f} B stored")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    commands = {"run": run_command, "demo": demo_command, "inspect": inspect_command, "compile": compile_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
