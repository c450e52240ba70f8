"""A run's small shared objects (counters, claims, file buffers), served from ONE Ray actor per driver.

While a run streams, its tasks and model actors report to a few small objects: the progress counter, the row
selection's counts, the image digests claimed so far, the per-partition file buffers. Each used to be an actor of
its own, and each actor is a worker process that imports Ray and pyarrow before it answers: four per run, paid again
by every run (every partition of a backfill, every test; `bench/actor_start.py` times both forms). Here one actor
(`ObjectHost`), started by a driver's first run and kept for its Ray job, holds each run's objects under names of
their own, and the run releases them when it ends. Calls reach an object one at a time and, from one caller, in
order: what each of these objects expected of an actor of its own.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

_HOSTS: dict[str, Any] = {}  # Ray job id -> this driver's ObjectHost (a new ray.init means a new job)


class ObjectHost:
    """The actor: named plain objects and a way to call their methods."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}

    def create(self, name: str, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.objects[name] = cls(*args, **kwargs)

    def call(self, name: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return getattr(self.objects[name], method)(*args, **kwargs)

    def release(self, name: str) -> None:
        self.objects.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.objects)


@dataclass(frozen=True)
class Hosted:
    """Handle of one hosted object: `handle.add.remote(...)` returns an ObjectRef, as an actor handle does, so the
    code that reports to it is the same as for an actor. Picklable: tasks and actors receive it as an argument."""

    host: Any
    name: str

    def __getattr__(self, method: str) -> _RemoteMethod:
        if method.startswith("_"):  # pickling and Ray's serializer probe private names: not ours
            raise AttributeError(method)
        return _RemoteMethod(self.host, self.name, method)


@dataclass(frozen=True)
class _RemoteMethod:
    host: Any
    name: str
    method: str

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.host.call.remote(self.name, self.method, args, kwargs)


def hosted(cls: type, *args: Any, **kwargs: Any) -> Hosted:
    """`cls(*args, **kwargs)` created in this driver's host actor (started on first use); `release` it."""
    import ray

    name = f"{cls.__name__}-{uuid.uuid4().hex[:12]}"
    host = _host()
    # Awaited: other processes may call the object as soon as this returns.
    try:
        ray.get(host.create.remote(name, cls, args, kwargs))
    except ray.exceptions.RayActorError:  # this driver's host died (its node went away): start another
        host = _host(fresh=True)
        ray.get(host.create.remote(name, cls, args, kwargs))
    return Hosted(host, name)


def release(handle: Hosted | None) -> None:
    """Drop the object from its host (its memory: a run's digests, buffered rows). Best effort, never raises."""
    if handle is None:
        return
    import ray

    with contextlib.suppress(Exception):  # the host is gone (the driver's Ray is shutting down): so is the object
        ray.get(handle.host.release.remote(handle.name), timeout=30)


def _host(fresh: bool = False) -> Any:
    import ray

    job = ray.get_runtime_context().get_job_id()
    host = None if fresh else _HOSTS.get(job)
    if host is None:
        _HOSTS.clear()
        host = ray.remote(num_cpus=0, max_restarts=0)(ObjectHost).remote()
        _HOSTS[job] = host
    return host
