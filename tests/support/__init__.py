"""What several test modules share, written once (test modules never import each other).

- `support.params`: the repository path, tiny settings (`tiny_params`, `write_sweep_params`)
  and the sweep stage's command.
- `support.processes`: child environments, free and dead ports, servers started on a free port
  (retried when another process took it first), and stopping process groups and trees by PID.
- `support.tracking`: MLflow: a sweep's parent and child runs, metric histories, a real
  `mlflow server` / `mlflow ui` on a free port.
- `support.files`: folder snapshots and the histories in a trial's checkpoints.
- `support.mounts`: folders and files that take no write, for real (read-only mounts, tmpfs).
- `support.dvc_project`: a temporary git + DVC repository of the project.
- `support.data_files`: tiny raw data files in each format the data layer reads.
- `support.system_tools`: system programs some tests need (skip, or fail under ECHO_CI).
- `support.slow`: the known-slow tests, so that tests/conftest.py starts them first.
"""
from .files import newest_history, snapshot, trial_checkpoints
from .params import REPO, SWEEP, tiny_params, write_params
from .processes import child_env, dead_port, free_port, stop, wait_port

__all__ = ["REPO", "SWEEP", "child_env", "dead_port", "free_port", "newest_history", "snapshot",
           "stop", "tiny_params", "trial_checkpoints", "wait_port", "write_params"]
