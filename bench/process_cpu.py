"""CPU time per kind of process under a command: the command itself, Ray's daemons, each Ray actor and task.

Runs the command, samples every process descended from it every `--sample-s` seconds (`/proc`: user + system
time, children included) and prints, at the end, the CPU seconds and the count of processes of each kind (a Ray
worker is named by the last actor or task it ran). A process's time is its last sample, so one that lives shorter
than a sample is missed and the figures are a lower bound.

    python bench/process_cpu.py -- python -m pytest -q tests/test_file_groups.py -k partitioned
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from jobs.interrupts import descendants  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
DAEMONS = ("raylet", "gcs_server", "dashboard_agent", "runtime_env", "log_monitor", "dashboard.py", "monitor.py")


def kind_of(command: str) -> str:
    if command.startswith("ray::"):
        return command.split()[0]
    return next((daemon for daemon in DAEMONS if daemon in command), command[:70])


def sample(pid: int) -> tuple[str, float] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return command, sum(int(v) for v in fields[11:15]) / TICK  # utime stime cutime cstime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample-s", type=float, default=0.25)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.monotonic()
    process = subprocess.Popen(command)
    seen: dict[int, tuple[str, float]] = {}
    while process.poll() is None:
        for pid in [process.pid, *descendants(process.pid)]:
            found = sample(pid)
            if found is None:
                continue
            name, cpu = found
            earlier = seen.get(pid, ("", 0.0))[0]
            # a Ray worker starts as "ray::IDLE" and is renamed by what it runs: keep the most specific name
            keep = earlier if earlier.startswith("ray::") and not earlier.startswith("ray::IDLE") else kind_of(name)
            seen[pid] = (keep, cpu)
        time.sleep(args.sample_s)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, cpu in seen.values():
        totals[name][0] += cpu
        totals[name][1] += 1
    print(f"exit {process.returncode}, wall {time.monotonic() - started:.1f} s, sampled CPU "
          f"{sum(cpu for cpu, _ in totals.values()):.1f} s", file=sys.stderr)  # fmt: skip
    for name, (cpu, count) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"{cpu:8.1f} s {count:4d}  {name}", file=sys.stderr)
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
