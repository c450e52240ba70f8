"""What a run's small shared objects cost to start: one Ray actor each (as before) against one host actor.

Every run reports to a progress counter, the selection's counts, the image digests claimed and the file buffers.
As four actors they were four worker processes per run; `pipeline.run.hosted` serves them from one actor per
driver. This starts both forms on a fresh local cluster, side by side, a few rounds each, and prints the wall time
until every object answers: four actors, the host on a driver's first run (the host starts too), and on its later
runs (a backfill's next partition, the next test). The machine's CPU flags come first: the figures depend on it.

    python bench/actor_start.py --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, not bench/pipeline.py


def cpu_flags() -> str:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + ", ".join(wanted)


def run_objects() -> list[tuple[type, tuple]]:
    """The small objects of one run, as (class, constructor arguments)."""
    from pipeline.run.file_groups import PartitionChunks
    from pipeline.run.progress import ProgressCounter
    from pipeline.run.row_selection import ContentClaims, SelectionCounter

    return [(ProgressCounter, ()), (SelectionCounter, ()), (ContentClaims, ()), (PartitionChunks, ([], 4))]


def answered(handles: list) -> None:
    """Wait until each of the four objects answers a call (actor handles and hosted handles alike)."""
    import ray

    progress, selection, claims, chunks = handles
    ray.get([progress.snapshot.remote(), selection.snapshot.remote(), claims.claim.remote([]), chunks.counts.remote()])


def four_actors() -> float:
    import ray

    started = time.perf_counter()
    actors = [ray.remote(num_cpus=0)(cls).remote(*args) for cls, args in run_objects()]
    answered(actors)
    took = time.perf_counter() - started
    for actor in actors:
        ray.kill(actor)
    return took


def one_host(first_run: bool) -> float:
    """The four objects in the host; on a driver's first run (`first_run`) the host itself starts too."""
    import ray

    from pipeline.run import hosted as hosting

    if first_run:
        for host in hosting._HOSTS.values():
            ray.kill(host)
        hosting._HOSTS.clear()
    started = time.perf_counter()
    handles = [hosting.hosted(cls, *args) for cls, args in run_objects()]
    answered(handles)
    took = time.perf_counter() - started
    for handle in handles:
        hosting.release(handle)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"CPU flags: {cpu_flags()}")
    for round_index in range(args.rounds):
        four, first, later = four_actors(), one_host(first_run=True), one_host(first_run=False)
        time.sleep(1.0)  # the killed actors' processes exit
        print(
            f"round {round_index + 1}: four actors {four:.2f} s; hosted: a driver's first run {first:.2f} s, "
            f"its later runs {later:.3f} s"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
