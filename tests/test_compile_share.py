"""Compiled code paid once per cluster: keys, sealed artifacts, and the publish-while-others-wait protocol.

The protocol runs against real storage (a local directory and moto's S3 server) with real processes; what is
built and loaded is a sealed artifact as `sam3core.compile_cache` makes it, around bytes that stand for torch's
caches (a real torch payload is the subject of the last test).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import BinaryIO

import pytest
import torch

from pipeline.model.compile_share import ArtifactRefused, Outcome, ShareSettings, obtain
from pipeline.storage import Location
from sam3core import build_sam3_vl_backbone
from sam3core.compile_cache import ArtifactError, CompileKey, artifact_kind, compile_key, seal, unseal

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = CompileKey(
    torch_version="2.13.0+cpu",
    python="3.11.7",
    device="cpu:avx512_bf16 (ATen AVX512, bfloat16 native)",
    dtype="bfloat16",
    imgsz=336,
    batch_size=8,
    vision_features_only=True,
    sam2_neck=False,
    plan="inductor (freezing=True)",
    artifact="aoti",
    model_config='{"d_model": 256}',
    checkpoint_sha256="ab" * 32,
    source_sha256="cd" * 32,
)
PAYLOAD = b"compiled code " * 1000


def unsealed(blob: bytes, key: CompileKey) -> bytes:
    """The payload of the sealed `blob` as `unseal` hands it on (the file left at its first byte)."""
    file = io.BytesIO(blob)
    unseal(file, key)
    return file.read()


def _other_value(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 14
    return f"{value}-other"


@pytest.mark.parametrize("component", [f.name for f in dataclasses.fields(CompileKey)])
def test_a_change_of_any_key_component_misses(component: str):
    other = dataclasses.replace(KEY, **{component: _other_value(getattr(KEY, component))})
    assert other.digest() != KEY.digest()  # another file name: a lookup misses
    with pytest.raises(ArtifactError, match=f"another key .*{component}"):
        unsealed(seal(PAYLOAD, KEY), other)  # and an artifact renamed into place is refused
    assert unsealed(seal(PAYLOAD, KEY), KEY) == PAYLOAD


def test_the_artifact_kind_is_a_package_on_a_cpu_and_torchs_caches_elsewhere_unless_the_environment_says() -> None:
    assert artifact_kind("cpu", {}) == "aoti" and artifact_kind("cuda", {}) == "caches"
    assert artifact_kind("cpu", {"SAM3_COMPILE_ARTIFACT": "caches"}) == "caches"
    assert artifact_kind("cuda", {"SAM3_COMPILE_ARTIFACT": "aoti"}) == "aoti"
    with pytest.raises(ValueError, match="SAM3_COMPILE_ARTIFACT must be one of"):
        artifact_kind("cpu", {"SAM3_COMPILE_ARTIFACT": "zip"})


@pytest.mark.timeout(120)
def test_the_key_of_a_built_model_follows_its_settings():
    def key(imgsz: int = 56, dtype: str = "bfloat16", batch: int = 2, checkpoint: str = "random:0", vision=True):
        torch.manual_seed(0)
        model = build_sam3_vl_backbone(config="tiny", imgsz=imgsz, dtype=dtype, compile_visual="on")
        return compile_key(model, batch_size=batch, vision_features_only=vision, checkpoint_sha256=checkpoint)

    base = key()
    assert base.dtype == "bfloat16" and base.imgsz == 56 and base.device.startswith("cpu:")
    assert base.artifact == artifact_kind("cpu")
    variants = [key(imgsz=84), key(dtype="float32"), key(batch=4), key(checkpoint="random:1"), key(vision=False)]
    digests = {base.digest(), *(k.digest() for k in variants)}
    assert len(digests) == 6
    assert key().digest() == base.digest()  # the same settings in another build: the same key


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]), id="flipped-bit"),
        pytest.param(lambda blob: blob[: len(blob) // 2], id="truncated"),
        pytest.param(lambda blob: seal(PAYLOAD, dataclasses.replace(KEY, imgsz=1008)), id="another-key"),
        pytest.param(lambda blob: b"<html>not an artifact</html>", id="not-an-artifact"),
    ],
)
def test_a_damaged_artifact_is_never_loaded_and_is_rebuilt(storage_root: Location, damage) -> None:
    actor = _Actor(storage_root)
    assert actor.run().how == "compiled and published" and actor.builds == 1
    artifact = storage_root.join(KEY.digest() + ".artifact")
    artifact.fs.pipe_file(artifact.path, damage(artifact.read_bytes()))

    second = _Actor(storage_root)
    outcome = second.run()
    assert outcome.how == "compiled and published" and outcome.note.startswith("rebuilt: ")
    assert second.builds == 1 and second.loaded == []  # nothing of the damaged artifact ran
    third = _Actor(storage_root)
    assert third.run().how == "loaded" and third.loaded == [PAYLOAD] and third.builds == 0


@pytest.mark.timeout(120)
def test_only_one_of_several_actors_compiles_the_others_wait_and_load(storage_root: Location) -> None:
    actors = [_Actor(storage_root, build_s=1.0) for _ in range(3)]
    outcomes: list[Outcome] = []
    threads = [threading.Thread(target=lambda a=a: outcomes.append(a.run())) for a in actors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(o.how for o in outcomes) == ["compiled and published", "loaded", "loaded"]
    assert sum(a.builds for a in actors) == 1
    assert not storage_root.join(KEY.digest() + ".claim").exists()  # the claim is gone once published


PUBLISHER = """
import sys, time
from pipeline.model.compile_share import ShareSettings, obtain
from pipeline.storage import Location
import json
root = Location.parse(sys.argv[1], json.loads(sys.argv[2]) or None)
def build():
    print("compiling", flush=True)
    time.sleep(3600)
obtain(ShareSettings(root=root, heartbeat_s=0.2), sys.argv[3], load=lambda file: None, build=build)
"""


def test_an_artifact_already_refused_is_not_fetched_again_until_it_is_replaced(storage_root: Location) -> None:
    """A waiter polls while someone rebuilds a refused artifact: it must not copy the same 0.9 GB each poll."""
    from pipeline.model.compile_share import _opened, _write

    artifact = storage_root.join("digest.artifact")
    with _opened(artifact, skip=None) as found:
        assert found is None  # absent
    _write(artifact, b"damaged")
    with _opened(artifact, skip=None) as found:
        assert found is not None and found[0].read() == b"damaged"
        refused = found[1]
    with _opened(artifact, skip=refused) as found:
        assert found is None  # the same object: skipped before it is opened for reading
    _write(artifact, b"rebuilt, and longer")
    with _opened(artifact, skip=refused) as found:
        assert found is not None and found[0].read() == b"rebuilt, and longer" and found[1] != refused


@pytest.mark.timeout(180)
def test_when_the_publisher_dies_a_waiting_actor_compiles_and_publishes(storage_root: Location) -> None:
    options = json.dumps(storage_root.storage_options or {})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, storage_root.uri, options, KEY.digest()],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert publisher.stdout.readline().strip() == "compiling"  # it holds the claim now
        claim = storage_root.join(KEY.digest() + ".claim")
        assert claim.exists()
        publisher.send_signal(signal.SIGKILL)  # killed mid-compilation: no cleanup, the claim stays
        publisher.wait(timeout=30)
        assert claim.exists()
        waiter = _Actor(storage_root, stale_s=1.5)
        outcome = waiter.run()
    finally:
        if publisher.poll() is None:
            publisher.kill()
    assert outcome.how == "compiled and published" and "took over" in outcome.note
    assert waiter.builds == 1 and outcome.waited_s < 60
    assert _Actor(storage_root).run().how == "loaded"


@pytest.mark.timeout(120)
def test_a_waiter_compiles_itself_when_a_live_publisher_takes_too_long(tmp_path: Path) -> None:
    root = Location.parse(str(tmp_path / "cache"))
    release = threading.Event()
    slow = _Actor(root, build_s=0.0, gate=release)
    thread = threading.Thread(target=slow.run)
    thread.start()
    try:
        while not root.join(KEY.digest() + ".claim").exists():
            time.sleep(0.05)
        impatient = _Actor(root, wait_s=1.0)
        outcome = impatient.run()
        assert outcome.how == "compiled after waiting" and impatient.builds == 1 and outcome.waited_s >= 1.0
    finally:
        release.set()
        thread.join(timeout=30)
    assert slow.builds == 1


class _Actor:
    """One model actor's side of the protocol: `build` seals PAYLOAD under KEY, `load` unseals (refusing what
    fails) and records what it would hand to torch."""

    def __init__(
        self,
        root: Location,
        *,
        build_s: float = 0.0,
        stale_s: float = 120.0,
        wait_s: float = 60.0,
        gate: threading.Event | None = None,
    ) -> None:
        self.settings = ShareSettings(root=root, wait_s=wait_s, stale_s=stale_s, poll_s=0.1, heartbeat_s=0.2)
        self.build_s, self.gate = build_s, gate
        self.builds = 0
        self.loaded: list[bytes] = []

    def build(self) -> bytes:
        self.builds += 1
        time.sleep(self.build_s)
        if self.gate is not None:
            self.gate.wait(timeout=60)
        return seal(PAYLOAD, KEY)

    def load(self, file: BinaryIO) -> None:
        try:
            unseal(file, KEY)
            self.loaded.append(file.read())
        except ArtifactError as error:
            raise ArtifactRefused(str(error)) from error

    def run(self) -> Outcome:
        return obtain(self.settings, KEY.digest(), load=self.load, build=self.build)


@pytest.mark.timeout(120)
def test_the_compile_command_refuses_what_it_cannot_do_and_says_when_nothing_compiles(tmp_path: Path, capsys):
    from jobs.cli import main

    assert main(["compile", "--random-weights", "--model-config", "tiny"]) == 2  # nowhere to publish
    assert "nowhere to publish" in capsys.readouterr().err
    args = ["compile", "--random-weights", "--model-config", "tiny", "--output", str(tmp_path / "out")]
    assert main([*args, "--set", "model.compile=off"]) == 2
    assert "nothing to compile" in capsys.readouterr().err
    # float32 on a CPU runs eagerly (compile auto): the command says so, publishes nothing
    assert main([*args, "--imgsz", "56", "--dtype", "float32", "--batch-size", "2"]) == 0
    assert "nothing compiled" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


COMPILING_PROCESS = """
import json, sys, torch
from torch._dynamo.utils import counters
from sam3core import compile_cache as cc
mode, path = sys.argv[1], sys.argv[2]
cc.start_recording()
from pathlib import Path
from torch._inductor.runtime.cache_dir_utils import cache_dir
if mode == "load":
    cc.load_artifacts(open(path, "rb").read())
kernels = sorted(p.relative_to(cache_dir()).as_posix() for p in Path(cache_dir()).glob("*/*.so"))
f = torch.compile(lambda x: torch.nn.functional.gelu(x * 3.0 + 1.0).sum(-1), fullgraph=True)
f(torch.randn(4, 8))
if mode == "save":
    open(path, "wb").write(cc.save_artifacts())
caches = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
after = sorted(p.relative_to(cache_dir()).as_posix() for p in Path(cache_dir()).glob("*/*.so"))
print(json.dumps([caches, kernels, after]))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_caches_saved_by_one_process_serve_another_with_an_empty_cache(tmp_path: Path) -> None:
    payload = tmp_path / "payload"

    def run(mode: str, cache_dir: str) -> dict:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache_dir)}
        out = subprocess.run(
            [sys.executable, "-c", COMPILING_PROCESS, mode, str(payload)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    caches, before, built = run("save", "node-a")
    assert caches == {"fxgraph_cache_miss": 1} and before == [] and built  # it compiled C++ kernels
    caches, installed, after = run("load", "node-b")
    # a fresh cache directory: the graph found in the loaded caches, its kernels installed before they were needed
    # (inductor builds a kernel only when its .so is absent)
    assert caches == {"fxgraph_cache_hit": 1}
    assert installed == built and after == built


def _tar(members: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param(b"not a tar", "unreadable", id="not-a-tar"),
        pytest.param(_tar({"kernels/ab/x.so": b""}), "no torch caches", id="no-torch-caches"),
        pytest.param(_tar({"torch-caches": b"not torch's caches"}), "torch could not load", id="torch-refuses"),
    ],
)
def test_a_payload_that_cannot_be_loaded_is_refused_even_with_a_valid_seal(payload: bytes, message: str) -> None:
    from sam3core.compile_cache import load_artifacts

    with pytest.raises(ArtifactError, match=message):
        load_artifacts(unsealed(seal(payload, KEY), KEY))


@pytest.mark.parametrize("name", ["kernels/../../evil.so", "kernels/ab/evil.py", "kernels/evil.so", "other/ab/x.so"])
def test_kernels_are_only_ever_written_where_inductor_keeps_them(tmp_path: Path, monkeypatch, name: str) -> None:
    from sam3core.compile_cache import load_artifacts

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache" / "inductor"))
    payload = _tar({"torch-caches": b"checked after the members", name: b"\x7fELF"})
    with pytest.raises(ArtifactError, match="unexpected member"):
        load_artifacts(unsealed(seal(payload, KEY), KEY))
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.rglob("x.so"))


def test_where_artifacts_go(tmp_path: Path) -> None:
    from pipeline.model.compile_share import compile_cache_uri

    output = str(tmp_path / "out")
    assert compile_cache_uri(None, output) == f"{output}/_compile_cache"  # beside the output by default
    assert compile_cache_uri("s3://bucket/compiled", output) == "s3://bucket/compiled"
    assert compile_cache_uri("off", output) is None and compile_cache_uri(False, output) is None  # YAML's off


AOTI_ACTOR = """
import hashlib, json, sys, torch
from torch._dynamo.utils import counters
from pipeline.model.embed import EmbedSettings, EmbedWorker
from sam3core.compile import remove_compile
from sam3core.vl_backbone import SAM3VLBackbone
warm_ups = []
warm_up = SAM3VLBackbone.warm_up
SAM3VLBackbone.warm_up = lambda self, *args, **kwargs: warm_ups.append(1) or warm_up(self, *args, **kwargs)
settings = EmbedSettings(
    checkpoint=None, model_config="tiny", imgsz=56, dtype="bfloat16", compile="on", bpe_path=None,
    features=("image_embedding", "text_embedding"), feature_dtype="float32", multi_caption=False, batch_size=1,
    compile_cache=sys.argv[1], compile_wait_s=300,
)
worker = EmbedWorker(settings)  # the pipeline's model actor: builds, warms up through the shared root
model = worker.backbone
images = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
with torch.inference_mode():
    packaged = model.forward_vision_features(images)
    routed = type(model.vision_backbone.trunk._compiled_call_impl).__name__
    pending = model.pending_weights()
    remove_compile(model.vision_backbone)
    eager = model.forward_vision_features(images)  # the trunk's blocks are made here if they were left for later
cosine = torch.nn.functional.cosine_similarity(packaged.float().flatten(), eager.float().flatten(), dim=0)
blocks = model.vision_backbone.trunk.blocks.state_dict()
digest = hashlib.sha256(b"".join(blocks[k].float().numpy().tobytes() for k in sorted(blocks))).hexdigest()
metadata = json.loads(next(iter(worker.metadata.values())))["model"]
print(json.dumps({"outcome": metadata["compile_outcome"], "compiled": metadata["compiled_vision"], "routed": routed,
                  "cosine": cosine.item(), "graphs": counters["stats"]["unique_graphs"], "warm_ups": len(warm_ups),
                  "pending": pending, "blocks_digest": digest}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_second_model_actor_loads_the_first_ones_aoti_package_and_compiles_nothing(tmp_path: Path) -> None:
    def actor(cache_dir: str) -> dict:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache_dir)}
        env["SAM3_COMPILE_ARTIFACT"] = "aoti"
        out = subprocess.run(
            [sys.executable, "-c", AOTI_ACTOR, str(tmp_path / "share")], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = actor("node-a")
    assert first["outcome"] == "compiled and published" and first["routed"] == "PackagedCall"
    second = actor("node-b")  # another node: an empty inductor cache, the package in the shared root
    assert second["outcome"] == "loaded" and second["compiled"] and second["routed"] == "PackagedCall"
    assert second["graphs"] == 0  # nothing traced, so nothing compiled
    assert first["warm_ups"] == 1 and second["warm_ups"] == 0  # a loaded package's first batch is its first call
    assert first["cosine"] > 0.999 and second["cosine"] > 0.999  # the packaged modules compute the model
    # the publisher made the trunk's weights to export them; the loader ran its batch without them, and made the
    # same values when it first ran the trunk eagerly
    assert first["pending"] == [] and second["pending"] == ["trunk"]
    assert second["blocks_digest"] == first["blocks_digest"]


def _tiny_vision() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam3_vl_backbone(config="tiny", imgsz=56, dtype="bfloat16", compile_visual="on").vision_backbone


@pytest.mark.parametrize(
    ("members", "message"),
    [
        pytest.param(None, "unreadable", id="not-a-tar"),
        pytest.param({}, "holds no module", id="empty"),
        pytest.param({"../trunk.pt2": b"x", "../trunk.inputs.json": b"[]"}, "not a compiled module", id="path"),
        pytest.param({"blocks.0.pt2": b"x", "blocks.0.inputs.json": b"[]"}, "not a compiled module", id="not-compiled"),
        pytest.param({"trunk.pt2": b"x"}, "no inputs", id="no-inputs"),
        pytest.param({"trunk.pt2": b"not a zip", "trunk.inputs.json": b"[]"}, "does not load", id="not-a-package"),
    ],
)
def test_a_package_that_cannot_be_installed_is_refused_and_leaves_the_model_as_it_was(members, message) -> None:
    from sam3core.aot_package import PackageError, install_package
    from sam3core.compile import compiled_modules

    vision = _tiny_vision()
    before = [m._compiled_call_impl for m in compiled_modules(vision)]
    with pytest.raises(PackageError, match=message):
        install_package(vision, b"not a tar" if members is None else _tar(members))
    assert [m._compiled_call_impl for m in compiled_modules(vision)] == before


class _ReadSizes(io.FileIO):
    """A file that remembers the most bytes any one read returned."""

    largest = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.largest = max(self.largest, len(data))
        return data


@pytest.mark.parametrize("source", ["file", "memory"])
def test_a_library_is_copied_out_of_the_artifact_byte_for_byte(tmp_path: Path, source: str) -> None:
    """From an artifact on disk the kernel copies each member (offsets into the file, after the sealed header);
    from memory, Python does. Either way the loader's file holds exactly the member."""
    import io
    import tarfile

    from sam3core.aot_package import copy_member

    members = {"trunk.pt2": os.urandom(3_000_001), "convs.2.pt2": os.urandom(70_000), "empty.pt2": b""}
    header = b"SAM3CC\n{...a sealed header...}\n"
    path = tmp_path / "x.artifact"
    path.write_bytes(header + _tar(members))
    with open(path, "rb") as artifact:
        artifact.seek(len(header))  # where unseal leaves an artifact's file
        payload = artifact if source == "file" else io.BytesIO(artifact.read())
        with tarfile.open(fileobj=payload, mode="r") as tar:
            for info in tar.getmembers():
                target = tmp_path / info.name
                with open(target, "w+b") as out:
                    copy_member(tar, info, out)
                assert target.read_bytes() == members[info.name], info.name


def test_an_artifact_is_checked_and_unpacked_in_chunks_never_read_whole(tmp_path: Path) -> None:
    """The full model's package is 0.9 GB: each whole copy of it in a starting actor was 0.9 GB more beside its
    model (docs/benchmarks.md, "Loading a package from its file")."""
    from sam3core.aot_package import PackageError, install_package

    library = os.urandom(40 << 20)  # not a library: the loader refuses it once it has been copied out
    path = tmp_path / "package.artifact"
    path.write_bytes(seal(_tar({"trunk.pt2": library, "trunk.inputs.json": b"[]"}), KEY))
    with _ReadSizes(path, "rb") as file:
        unseal(file, KEY)
        with pytest.raises(PackageError, match=r"'trunk\.pt2' does not load"):
            install_package(_tiny_vision(), file)
        assert 0 < file.largest <= 16 << 20 < len(library)


def test_a_packaged_module_called_with_other_inputs_than_its_own_runs_eagerly_with_one_warning() -> None:
    from sam3core.aot_package import PackagedCall, _signature

    vision = _tiny_vision()
    conv = vision.convs[-1]
    compiled_for = torch.zeros(1, 64, 4, 4, dtype=torch.bfloat16)
    library_calls = []

    def library(x: torch.Tensor) -> torch.Tensor:  # stands for the compiled library: only its own shapes
        assert x.shape == compiled_for.shape
        library_calls.append(x.shape)
        return conv._call_impl(x)

    conv._compiled_call_impl = PackagedCall(library, conv, "convs.3", _signature((compiled_for,), {}))
    with torch.inference_mode():
        conv(compiled_for)
        with pytest.warns(RuntimeWarning, match="runs eagerly"):
            other = conv(torch.zeros(2, 64, 4, 4, dtype=torch.bfloat16))
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            conv(torch.zeros(2, 64, 4, 4, dtype=torch.bfloat16))
    assert again == []  # one warning, not one per batch
    assert library_calls == [compiled_for.shape] and other.shape[0] == 2


def test_a_packaged_module_whose_library_fails_runs_eagerly_from_then_on_with_one_warning() -> None:
    from sam3core.aot_package import PackagedCall, _signature

    vision = _tiny_vision()
    conv = vision.convs[-1]
    x = torch.rand(1, 64, 4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    library_calls = []

    def library(x: torch.Tensor) -> torch.Tensor:  # stands for a library that loaded but cannot run here
        library_calls.append(x.shape)
        raise RuntimeError("run_func_( container_handle_, ...) API call failed")

    conv._compiled_call_impl = PackagedCall(library, conv, "convs.3", _signature((x,), {}))
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match=r"convs\.3's compiled library failed, running it eagerly: Runtime"):
            first = conv(x)
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            second = conv(x)
        expected = conv._call_impl(x)
    assert again == [] and library_calls == [x.shape]  # given up after one failure, said once
    assert torch.equal(first, expected) and torch.equal(second, expected)  # the batch is not lost: eager computes it


def test_a_failing_library_over_a_trunk_without_weights_makes_them_and_computes_the_batch() -> None:
    from sam3core.aot_package import PackagedCall, _signature
    from sam3core.compile import remove_compile

    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="tiny", imgsz=56, dtype="bfloat16", compile_visual="on", defer=("trunk",))
    torch.manual_seed(0)
    reference = build_sam3_vl_backbone(config="tiny", imgsz=56, dtype="bfloat16")
    trunk = model.vision_backbone.trunk
    images = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def library(x: torch.Tensor) -> list[torch.Tensor]:  # a loaded package whose library cannot run here
        raise RuntimeError("run_func_( container_handle_, ...) API call failed")

    remove_compile(model.vision_backbone)
    trunk._compiled_call_impl = PackagedCall(library, trunk, "trunk", _signature((images,), {}))
    assert model.pending_weights() == ["trunk"] and trunk.blocks[0].mlp.fc1.weight.is_meta
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="trunk's compiled library failed"):
            out = model.forward_vision_features(images)
        expected = reference.forward_vision_features(images)
    assert model.pending_weights() == [] and not trunk.blocks[0].mlp.fc1.weight.is_inference()
    assert torch.equal(out, expected)  # the same weights as a model built whole: the batch is right, not lost


def test_a_packaged_module_out_of_memory_is_raised_not_hidden_by_eager() -> None:
    from sam3core.aot_package import PackagedCall, _signature

    vision = _tiny_vision()
    conv = vision.convs[-1]
    x = torch.zeros(1, 64, 4, 4, dtype=torch.bfloat16)

    def library(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    conv._compiled_call_impl = call = PackagedCall(library, conv, "convs.3", _signature((x,), {}))
    with torch.inference_mode(), pytest.raises(torch.OutOfMemoryError):
        conv(x)
    assert call.failed is None  # a smaller batch may still run the library
