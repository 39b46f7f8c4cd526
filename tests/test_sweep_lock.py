"""One driver per sweep: a second driver of the same sweep refuses in one line naming the
running one (pipeline.sweep.experiment.experiment_lock). docs/reliability.md lists what each
test proves."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from pipeline.sweep.errors import SweepLocked
from pipeline.sweep.experiment import experiment_lock
from support.processes import stop

HOLDER = textwrap.dedent("""
    import json, os, socket, sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))           # a driver slow to write its owner file (a loaded machine)
    with open(sys.argv[2] + ".tmp", "w") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": "now",
                   "command": "python -m stages.sweep --params params.yaml"}, fh)
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(120)
""")


def test_a_driver_refused_before_the_holder_wrote_its_name_still_names_it(tmp_path):
    """The holder writes its owner file just after it took the lock; a second driver refused in
    between waits for the file (seconds) instead of naming no one, and never names a dead
    driver's stale file."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    owner = tmp_path / ".s.owner.json"
    owner.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                 "started": "earlier", "command": "a driver that was killed"}))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".s.lock"),
                               str(owner), "1.5"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SweepLocked) as info:
            with experiment_lock(str(tmp_path), "s"):
                pass
    finally:
        stop(holder)
    message = str(info.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in message, message
    assert "stages.sweep" in message and "killed" not in message and "\n" not in message
