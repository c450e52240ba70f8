"""One actor per driver serves each run's small objects (`pipeline.run.hosted`)."""

from __future__ import annotations

import time

import pytest


@pytest.mark.timeout(60)
def test_objects_of_one_driver_share_one_actor_and_are_released(ray_local: None) -> None:
    import ray

    from pipeline.run.hosted import hosted, release
    from pipeline.run.row_selection import ContentClaims, SelectionCounter

    first, second = hosted(SelectionCounter), hosted(ContentClaims)
    assert first.host == second.host and first.name != second.name

    @ray.remote(num_cpus=0)
    def report(handle, key: str) -> None:  # another process calls it as it would call an actor
        ray.get(handle.add.remote({key: 2}))

    ray.get([report.remote(first, "a"), report.remote(first, "a")])
    assert ray.get(first.snapshot.remote()) == {"a": 4}
    assert ray.get(second.claim.remote(["x", "y", "x"])) == [True, True, False]
    with pytest.raises(ray.exceptions.RayTaskError, match="TypeError"):
        ray.get(second.claim.remote(None))  # the object's own error reaches the caller

    release(first)
    held = ray.get(first.host.names.remote())  # the session's earlier runs share the host: theirs are released
    assert second.name in held and first.name not in held
    release(second)
    release(second)  # twice, or once the host is gone: nothing to do
    assert second.name not in ray.get(first.host.names.remote())
    with pytest.raises(AttributeError):
        first._private  # noqa: B018 (pickling probes private names: they are not remote methods)


@pytest.mark.timeout(60)
def test_a_dead_host_is_replaced_on_the_next_run(ray_local: None) -> None:
    import ray

    from pipeline.run.hosted import hosted, release
    from pipeline.run.row_selection import SelectionCounter

    handle = hosted(SelectionCounter)
    ray.kill(handle.host)
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):  # ray.kill returns at once; the host dies soon after
        while time.monotonic() < deadline:
            ray.get(handle.host.names.remote(), timeout=30)
            time.sleep(0.1)
    replacement = hosted(SelectionCounter)
    assert replacement.host != handle.host
    ray.get(replacement.add.remote({"rows": 1}))
    assert ray.get(replacement.snapshot.remote()) == {"rows": 1}
    release(replacement)


@pytest.mark.timeout(120)
def test_a_run_that_fails_after_ray_started_leaves_nothing_in_the_host(
    ray_local: None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import numpy as np
    import ray
    from PIL import Image

    import pipeline.run.job
    from pipeline import JobConfig, run_job
    from pipeline.run.hosted import _host

    image = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(image)}) + "\n")
    config = JobConfig.from_dict(
        {
            "input": {"uri": str(tmp_path / "m.jsonl")},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"config": "tiny", "imgsz": 56, "random_weights": True},
        }
    )

    def unreadable(*args, **kwargs):
        raise OSError("the input went away")

    before = set(ray.get(_host().names.remote()))
    monkeypatch.setattr(pipeline.run.job, "read_source", unreadable)  # fails once the run's objects exist
    with pytest.raises(OSError, match="went away"):
        run_job(config)
    assert set(ray.get(_host().names.remote())) <= before
