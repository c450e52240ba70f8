"""`sam3-embed compile`: compile the model ahead of a job and publish the artifact its actors will load.

It builds the model exactly as the job's model actors will (`pipeline.model.embed.EmbedWorker`: same checkpoint,
model configuration, image size, dtype, batch size and stored features, hence the same key), warms it up here and
publishes the compiled code (an AOTInductor package on a CPU, torch's caches on CUDA: `SAM3_COMPILE_ARTIFACT`) to the
job's `model.compile_cache` (by default `<output>/_compile_cache`). Run it on a machine like the job's workers (same
torch, same CPU instruction set or GPU model): on another, the key differs and the actors compile again.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jobs import exit_codes
from jobs.job_config import apply_overrides, read_config_data
from pipeline.config import JobConfig

COMPILE_FLAGS: dict[str, tuple[str, Any]] = {
    "output": ("output.uri", str),
    "checkpoint": ("model.checkpoint", str),
    "model_config": ("model.config", str),
    "imgsz": ("model.imgsz", int),
    "dtype": ("model.dtype", str),
    "compile_cache": ("model.compile_cache", str),
    "features": ("output.features", lambda text: [c.strip() for c in text.split(",") if c.strip()]),
    "batch_size": ("compute.batch_size", int),
    "s3_endpoint_url": ("s3.endpoint_url", str),
}


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "compile", allow_abbrev=False, help="compile the model ahead of a job and publish it for the job's actors"
    )
    parser.add_argument("--config", metavar="PATH_OR_URI", help="the job file (YAML) the job will run with")
    parser.add_argument("--output", metavar="URI", help="the job's output (artifacts go to <output>/_compile_cache)")
    parser.add_argument("--compile-cache", metavar="URI", help="where to publish instead (model.compile_cache)")
    parser.add_argument("--checkpoint", metavar="PATH_OR_URI")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--model-config", choices=["sam3", "tiny"])
    parser.add_argument("--imgsz", type=int)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--features", metavar="NAME[,NAME]")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--s3-endpoint-url", metavar="URL")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def compile_command(args: argparse.Namespace) -> int:
    try:
        data = read_config_data(args.config) if args.config else {}
        overrides = [
            f"{path}={json.dumps(parse(getattr(args, flag)))}"
            for flag, (path, parse) in COMPILE_FLAGS.items()
            if getattr(args, flag) is not None
        ]
        if args.random_weights:
            overrides.append("model.random_weights=true")
        config = JobConfig.from_dict(apply_overrides(data, overrides + args.overrides))
    except (OSError, ValueError, TypeError) as error:
        print(f"error: cannot build the job config: {error}", file=sys.stderr)
        return exit_codes.USAGE
    if config.model.checkpoint is None and not config.model.random_weights:
        print("error: no checkpoint: pass --checkpoint (or --random-weights)", file=sys.stderr)
        return exit_codes.USAGE
    if not (config.model.compile_cache or config.output.uri) or config.model.compile_cache == "off":
        print("error: nowhere to publish: pass --output (the job's) or --compile-cache URI", file=sys.stderr)
        return exit_codes.USAGE
    if config.model.compile in ("off", False):  # YAML reads a bare off as False
        print("error: model.compile is off for this job: nothing to compile", file=sys.stderr)
        return exit_codes.USAGE
    from pipeline.model.embed import EmbedSettings, EmbedWorker

    settings = EmbedSettings.from_job(
        config,
        multi_caption=False,
        captions=False,  # only the vision modules are compiled: no text encoder to build
        threads=config.compute.threads_per_actor,
        storage_options=config.storage_options(),
    )
    worker = EmbedWorker(settings)
    outcome = worker.compile_outcome
    if outcome is None:
        mode = f"{config.model.dtype} on {worker.device.type}, compile {config.model.compile}"
        print(f"nothing compiled: the model runs eagerly ({mode})")
        return exit_codes.OK
    note = f" ({outcome.note})" if outcome.note else ""
    print(f"{outcome.how} in {worker.warm_up_seconds:.1f}s at {settings.compile_cache}{note}")
    return exit_codes.OK
