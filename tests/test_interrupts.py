"""Ctrl-C and SIGTERM: `sam3-embed run` exits 130 / 143 within seconds at any point, leaves no Ray process
behind, and the rerun with the same --resume-path finishes the job with every row once.

Each test runs the real command in its own session with its own RAY_TMPDIR (so its Ray processes can be told
apart from the shared test cluster's) and sends the signal as a terminal does: Ctrl-C to the whole foreground
process group (Ray's raylet and GCS included), SIGTERM to the driver alone (`kill`, `ray job stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import read_embeddings

REPO_ROOT = Path(__file__).resolve().parents[1]
# Two decode blocks of 32 rows: the first file is written once the first block is through the model, while the
# second is still to go (8 batches of 4), so a signal sent at the first file lands mid-run. 504 px keeps a batch
# long enough for that (about a second for the tiny model on a CPU) at a third of the cost of 1008 px.
ROWS = 64
IMGSZ = 504
EXIT_WITHIN_S = 20.0  # the watchdog forces the exit 10 s after the signal; the rest is margin for a busy machine


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # Short: Ray's socket paths under it must fit in a Unix socket name (107 bytes).
    path = Path(tempfile.mkdtemp(prefix="ri-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def manifest(tmp_path: Path) -> Path:
    rows = []
    for i in range(ROWS):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "caption": f"picture {i}"})
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def command(tmp_path: Path, source: Path) -> list[str]:
    return [
        sys.executable,
        *("-m", "jobs.cli", "run", "--input", str(source), "--output", str(tmp_path / "out")),
        *("--resume-path", str(tmp_path / "ckpt"), "--random-weights", "--model-config", "tiny"),
        *("--imgsz", str(IMGSZ), "--batch-size", "4", "--set", "output.min_rows_per_file=4"),
    ]


def environment(ray_tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def processes_using(path: Path, width: int = 160) -> list[str]:
    """Command lines of live processes that name `path` (a Ray session under this RAY_TMPDIR)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != b"Z":
            found.append(f"{entry}: {cmdline[:width]}")
    return found


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout_s}s:\n{log.read_text(errors='replace')}")


def first_data_file(tmp_path: Path) -> bool:
    return any((tmp_path / "out").rglob("*.parquet"))


def check_local_cluster(ray_tmp: Path) -> None:
    """The local cluster a run started without -v (pipeline.run.console.start_ray) serves no dashboard: Ray keeps a
    minimal head process, without its frontend."""
    heads = [p for p in processes_using(ray_tmp, width=4000) if "dashboard/dashboard.py" in p]
    assert heads and all("--disable-frontend" in p for p in heads), heads


def interrupt(tmp_path: Path, ray_tmp: Path, marker: str, delay_s: float, signum: int, group: bool) -> str:
    """Start a run, wait for `marker` on stderr (or, for "FILE", the first data file) and `delay_s` more, send
    the signal; returns stderr."""
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command(tmp_path, manifest(tmp_path)),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=environment(ray_tmp),
            start_new_session=True,
        )
        try:
            if marker == "FILE":
                deadline = time.monotonic() + 180
                while not first_data_file(tmp_path) and time.monotonic() < deadline and process.poll() is None:
                    time.sleep(0.2)
            else:
                wait_for_line(log, marker, process, timeout_s=120)
            time.sleep(delay_s)
            assert process.poll() is None, "the run ended before the signal"
            if marker == "FILE":  # mid-run, the local cluster is up
                check_local_cluster(ray_tmp)
            sent = time.monotonic()
            os.killpg(process.pid, signum) if group else os.kill(process.pid, signum)
            code = process.wait(timeout=60)
            took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    printed = log.read_text(errors="replace")
    assert code == 128 + signum, printed
    assert took < EXIT_WITHIN_S, f"exited {took:.1f}s after the signal"
    assert "Traceback" not in printed, printed
    assert printed.strip().splitlines()[-1].startswith("run ") and "interrupted" in printed.splitlines()[-1]
    deadline = time.monotonic() + 5
    while processes_using(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(ray_tmp) == [], "\n".join(processes_using(ray_tmp))
    return printed


def finish_and_check(tmp_path: Path, ray_tmp: Path, driver_env: dict[str, str]) -> None:
    """The same command again: exit 0, every input row exactly once. It joins the session's cluster: what is
    tested is the resume, and a second local cluster would cost both cores for its start-up."""
    result = subprocess.run(
        command(tmp_path, tmp_path / "m.jsonl"), capture_output=True, text=True, env=driver_env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    ids = read_embeddings(str(tmp_path / "out")).column("id").to_pylist()
    assert len(ids) == ROWS and len(set(ids)) == ROWS
    assert processes_using(ray_tmp) == []


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ctrl_c_mid_run_exits_130_in_seconds_leaves_no_ray_process_and_the_rerun_finishes(
    tmp_path: Path, ray_tmp: Path, ray_driver_env: dict[str, str]
) -> None:
    # mid-run: files of the first batches written, more rows decoded and in the model
    printed = interrupt(tmp_path, ray_tmp, "FILE", delay_s=0, signum=signal.SIGINT, group=True)
    assert f"--resume-path {tmp_path / 'ckpt'}" in printed  # says how to continue
    finish_and_check(tmp_path, ray_tmp, ray_driver_env)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_while_ray_starts_exits_130_and_leaves_no_ray_process(tmp_path: Path, ray_tmp: Path) -> None:
    interrupt(tmp_path, ray_tmp, "no id column", delay_s=2, signum=signal.SIGINT, group=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_to_the_driver_exits_143_and_stops_the_local_cluster(tmp_path: Path, ray_tmp: Path) -> None:
    interrupt(tmp_path, ray_tmp, "FILE", delay_s=0, signum=signal.SIGTERM, group=False)


DROPPED_INTERRUPT = """
import os, signal, subprocess, time
from jobs.interrupts import stop_on_signals
sent = []
def ctrl_c_once():  # a Ctrl-C landing in an at-fork callback (logging has one) while Ray starts its processes
    if not sent:
        sent.append(True)
        signal.raise_signal(signal.SIGINT)
os.register_at_fork(after_in_parent=ctrl_c_once)
try:
    with stop_on_signals("run x: interrupted", grace_s=60):
        subprocess.run(["true"], check=True, preexec_fn=os.getpid)  # with a preexec_fn, as Ray starts processes
        for _ in range(100):  # the run going on
            time.sleep(0.05)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.timeout(60)
def test_a_ctrl_c_that_python_drops_in_a_fork_callback_still_interrupts_the_run() -> None:
    """Python reports and drops an exception raised in an at-fork callback: the interrupt must come again."""
    result = subprocess.run(
        [sys.executable, "-c", DROPPED_INTERRUPT],
        capture_output=True,
        text=True,
        env=environment(Path("/nonexistent")),
        timeout=30,
    )
    assert result.stdout.strip() == "interrupted", result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


STALLING_DRIVER = """
import subprocess, sys, time
from jobs.interrupts import stop_on_signals
with stop_on_signals("run x: interrupted", grace_s=float(sys.argv[1])):
    child = subprocess.Popen(["sleep", "300"])  # stands for a local cluster's raylet
    try:
        print(child.pid, flush=True)
        time.sleep(300)
    except KeyboardInterrupt:
        time.sleep(300)  # a shutdown that hangs, as a driver calling a GCS that is going away does
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second_signal", [False, True], ids=["watchdog", "second-ctrl-c"])
def test_a_stalled_shutdown_is_cut_short_and_its_child_processes_killed(second_signal: bool) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", STALLING_DRIVER, "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(Path("/nonexistent")),
    )
    child = int(process.stdout.readline())
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    if second_signal:
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
    code = process.wait(timeout=30)
    took = time.monotonic() - sent
    assert code == 130
    assert took < (2 if second_signal else 8), took
    assert (took > 3.5) != second_signal  # the watchdog waits its grace period; a second Ctrl-C does not
    assert "run x: interrupted" in process.stderr.read()
    deadline = time.monotonic() + 3
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or b") Z" in Path(f"/proc/{child}/stat").read_bytes()
