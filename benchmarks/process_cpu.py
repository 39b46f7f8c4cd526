"""Where a command's CPU time goes, process by process (issue 25: the test suite is CPU-bound).

    python -m benchmarks.process_cpu [--json FILE] [--interval 0.3] -- COMMAND [ARG ...]

Runs COMMAND and, while it runs, reads every process's user + system CPU time from
/proc/<pid>/stat every `--interval` seconds. At the end it prints, per kind of process (a Ray
trial worker, Ray's daemons, a stage, a pytest-xdist worker, DVC, MLflow's server, ...), the
CPU-seconds and the number of processes, beside the machine's whole CPU time over the run
(`/proc/stat`). Processes that were running before COMMAND started count only what they used
during it. A process that lives less than one interval may be missed: the machine's total is
the check. Linux only. For example, the README's test command on a clean clone:

    ECHO_CI=1 python -m benchmarks.process_cpu --json cpu.json -- \\
        python3 -m pytest -q -n 2 --dist loadgroup
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
# (kind, a substring of the command line), first match wins; anything else is "other". Paths
# in arguments (a store under /tmp/pytest-of-*/) must not decide: markers name the program.
KINDS = [
    ("pytest-xdist worker", "import sys;exec(eval(sys.stdin.readline()))"),
    ("Ray worker (trials)", "ray/_private/workers/"),
    ("Ray worker (trials)", "ray::"),
    ("Ray daemons", "ray/dashboard/"),
    ("Ray daemons", "ray/_private/log_monitor.py"),
    ("Ray daemons", "ray/_private/runtime_env/agent/"),
    ("Ray daemons", "ray/autoscaler/_private/monitor.py"),
    ("Ray daemons", "/raylet/raylet "),
    ("Ray daemons", "/gcs/gcs_server "),
    ("ray CLI (start, stop, up, submit)", "/bin/ray "),
    ("stage: sweep driver", "-m stages.sweep"),
    ("stage: sweep driver", "/sweep.py "),              # `ray submit ... stages/sweep.py`
    ("stage: evaluate", "-m stages.evaluate"),
    ("stage: frontier", "-m stages.frontier"),
    ("stage: prepare", "-m stages.prepare"),
    ("benchmarks", "-m benchmarks"),
    ("multiprocessing spawn", "multiprocessing.spawn"),
    ("MLflow server / ui", "-m mlflow "),
    ("MLflow server / ui", "/bin/mlflow "),
    ("MLflow server / ui", "uvicorn"),
    ("DVC", "/bin/dvc "),
    ("pytest", "-m pytest"),
    ("chromium", "chromium"),
    ("ssh / sshd / rsync", "ssh"),
    ("ssh / sshd / rsync", "rsync"),
]


def kind_of(cmdline: str) -> str:
    return next((kind for kind, marker in KINDS if marker in cmdline), "other")


def machine_cpu_seconds() -> float:
    """The machine's CPU time so far: user + nice + system + irq + softirq + steal."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / TICK


def snapshot() -> dict[tuple[int, int], float]:
    """(pid, start time) -> CPU-seconds so far, for every process readable now."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue                        # ended meanwhile
            rest = stat[stat.rindex(")") + 2:].split()
            out[(int(entry.name), int(rest[19]))] = (int(rest[11]) + int(rest[12])) / TICK
    return out


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def measure(command: list[str], interval: float = 0.3) -> dict:
    """Run `command`; its exit code, wall seconds, the machine's CPU-seconds over it, and the
    CPU-seconds and process count per kind."""
    before = snapshot()                         # what ran before counts only its increase
    seen: dict[tuple[int, int], list] = {}     # key -> [cmdline, first, last CPU-seconds]
    cpu0, t0 = machine_cpu_seconds(), time.monotonic()
    proc = subprocess.Popen(command)
    while True:
        done = proc.poll() is not None
        for key, cpu in snapshot().items():
            if key[0] == os.getpid():
                continue                        # this process's own polling
            if key not in seen:
                seen[key] = [command_line(key[0]), before.get(key, 0.0), cpu]
            seen[key][2] = cpu
        if done:
            break
        time.sleep(interval)
    wall, machine = time.monotonic() - t0, machine_cpu_seconds() - cpu0
    kinds: dict[str, dict] = {}
    for cmdline, first, last in seen.values():
        if last - first > 0:
            row = kinds.setdefault(kind_of(cmdline), {"cpu_s": 0.0, "processes": 0})
            row["cpu_s"] += last - first
            row["processes"] += 1
    return {"command": command, "returncode": proc.returncode, "wall_s": round(wall, 1),
            "machine_cpu_s": round(machine, 1),
            "kinds": {k: {"cpu_s": round(v["cpu_s"], 1), "processes": v["processes"]}
                      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]["cpu_s"])}}


def table(result: dict) -> str:
    lines = [f"{'CPU-s':>8}  {'procs':>5}  kind", f"{'-' * 8}  {'-' * 5}  {'-' * 30}"]
    for kind, row in result["kinds"].items():
        lines.append(f"{row['cpu_s']:8.1f}  {row['processes']:5d}  {kind}")
    counted = sum(row["cpu_s"] for row in result["kinds"].values())
    lines.append(f"{counted:8.1f}         counted, of {result['machine_cpu_s']:.1f} CPU-s the "
                 f"machine used in {result['wall_s']:.1f} s (exit {result['returncode']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.process_cpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--interval", type=float, default=0.3, help="seconds between readings")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command: give it after --, e.g. -- python3 -m pytest -q")
    if not Path("/proc/stat").exists():
        p.error("needs Linux's /proc")
    if args.interval <= 0:
        p.error("--interval must be > 0")
    result = measure(command, args.interval)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
