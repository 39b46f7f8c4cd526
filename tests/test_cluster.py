"""The cluster configurations: both YAMLs pass Ray's own cluster-config schema and agree with the
Docker image and the pipeline, and the on-premise one runs for real: `ray up` / `ray submit` /
`ray down` against an SSH server on 127.0.0.1 (real sshd, real Ray cluster launcher, real sweep,
MLflow on SQLite on the "head")."""
from __future__ import annotations

import fnmatch
import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from support import REPO
from support.processes import free_ports, serve
from support.system_tools import require_tool
YAMLS = ("cluster.yaml", "cluster-onprem.yaml")


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _sweep_code_deps() -> list[str]:
    """The project code the sweep stage imports (dvc.yaml's deps, which tests/test_dvc.py checks
    against the real imports): what every node must have."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sweep"]["deps"]
    return [d for d in deps if d.split("/")[0] in ("echo", "pipeline", "stages")]


@pytest.mark.parametrize("name", YAMLS)
def test_cluster_yaml_passes_rays_schema(name):
    """The check `ray up` makes before it starts anything: the YAML against ray-schema.json, and
    again after Ray has filled in its provider's defaults."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load(name)
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    # A typo in a field is caught by the same schema (the check above can fail).
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "file_mount": {}}, schema)


def _dockerfile() -> tuple[str, str, list[str]]:
    """(base image argument, WORKDIR, .dockerignore patterns)."""
    text = (REPO / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    assert len(workdir) == 1, "one WORKDIR in the Dockerfile"
    base = re.search(r"^ARG\s+BASE_IMAGE=(\S+)", text, re.M)
    assert base and re.search(r"^FROM\s+\$\{?BASE_IMAGE\}?\s*$", text, re.M), \
        "the Dockerfile takes its base image as build argument BASE_IMAGE"
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    return base.group(1), workdir[0], ignore


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out, as Docker reads it: a pattern matches from the
    context root (`data/` is ./data, not echo/data), a folder it matches takes its contents
    along, and a leading `**/` matches at any depth."""
    parts = path.split("/")
    for pattern in patterns:
        pattern = pattern.strip("/")
        anywhere = pattern.startswith("**/")
        pattern = pattern.removeprefix("**/")
        for i in range(1, len(parts) + 1):
            starts = range(i) if anywhere else [0]
            if any(fnmatch.fnmatchcase("/".join(parts[j:i]), pattern) for j in starts):
                return True
    return False


def test_aws_cluster_and_image_agree_on_where_the_project_lives():
    """cluster.yaml runs the image: its file mounts land in the image's WORKDIR (where `ray
    submit` runs the stage: `docker exec` starts there), they carry what the image leaves out
    (params are mounted over the image's copy; prepared data is not in the image), and the image
    holds the code the sweep imports."""
    _, workdir, ignore = _dockerfile()
    config = _load("cluster.yaml")
    # Ray's auth token goes to the image user's home (tests/test_cluster_security.py).
    mounts = {t: s for t, s in config["file_mounts"].items()
              if s != "~/.config/echo-rd/ray-cluster-token"}
    assert mounts, "cluster.yaml mounts params and data"
    for target, source in mounts.items():
        assert Path(target).parent.as_posix() in (workdir, f"{workdir}/data"), target
        assert Path(target).relative_to(workdir).as_posix() == Path(source).as_posix(), \
            (target, source)
    targets = {Path(t).relative_to(workdir).as_posix() for t in mounts}
    prepared = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["prepared_dir"]
    assert {"params.yaml", prepared} <= targets
    assert _ignored(f"{prepared}/digits.npz", ignore), "prepared data reaches nodes by mount"
    # The image runs `dvc repro`: every stage's code, the pipeline and its params are in it.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    needed = {"dvc.yaml", "params.yaml", "params.paper.yaml", "pyproject.toml", ".dvc/config"}
    needed |= {d for s in stages.values() for d in s["deps"]
               if d.split("/")[0] in ("echo", "pipeline", "stages")}
    for path in sorted(needed):
        assert (REPO / path).exists() and not _ignored(path, ignore), \
            f"{path} is left out of the image"
    # Ray's launcher copies into a running container with rsync; DVC needs git.
    assert re.search(r"apt-get install[^\n]*\bgit\b[^\n]*\brsync\b",
                     (REPO / "Dockerfile").read_text())
    # Every path the YAML's comments and commands name is the image's WORKDIR.
    text = (REPO / "cluster.yaml").read_text()
    assert "/app" not in text
    assert config["docker"]["image"] and workdir in text


def test_onprem_cluster_syncs_what_the_sweep_imports():
    config = _load("cluster-onprem.yaml")
    assert config["provider"]["type"] == "local"
    sources = {Path(s).as_posix(): t for t, s in config["file_mounts"].items()}
    for dep in _sweep_code_deps():
        top = dep.split("/")[0]
        assert sources.get(top) == f"~/{top}", f"{dep} does not reach the nodes"
    prepared = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["prepared_dir"]
    assert sources["params.yaml"] == "~/params.yaml" and sources[prepared] == f"~/{prepared}"


# ---- ray up / submit / down on an SSH "head" at 127.0.0.1 -----------------------------------
TINY = {
    "data": {"dataset": "digits"},
    "train": {"epochs": 2, "batch_size": 50, "lr": 0.002, "device": "cpu"},
    "sweep": {"name": "cluster", "methods": ["echo", "vae"], "betas": [0.3, 1.0],
              "archs": ["mlp"], "latent_dims": [4], "max_concurrent": 2, "train_limit": 200,
              "test_limit": 100, "checkpoint_every": 1, "checkpoint_min_interval_s": 0},
}
RELAY = '''"""ssh ProxyCommand: connect stdin/stdout to host:port (Ray has no ssh port setting)."""
import os, socket, sys, threading
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := os.read(0, 65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := conn.recv(65536):
    os.write(1, data)
'''


@pytest.fixture
def ssh_head(tmp_path: Path):
    """A "head box" at 127.0.0.1: a real sshd (throwaway host and user keys, key login only) in
    its own mount and PID namespaces, where root's home directory is a fresh folder and
    /tmp/ray is private. So what `ray up` does there stays there: the run directory is that
    home, `ray stop` (which kills every Ray process it can see) sees only the head's, and Ray
    programs elsewhere on this machine do not find the head's cluster in /tmp/ray. Stopping it
    ends the namespace, which ends every process started in it (Ray included)."""
    for tool, package in (("/usr/sbin/sshd", "openssh-server"), ("unshare", "util-linux"),
                          ("rsync", "rsync"), ("ssh", "openssh-client")):
        require_tool(tool, package)         # skipped without it; a failure in CI (ECHO_CI)
    if os.geteuid() != 0:
        pytest.skip("the SSH head needs root (mount and PID namespaces)")
    ssh = tmp_path / "ssh"
    home = tmp_path / "head"
    ray_tmp = tmp_path / "head-tmp-ray"
    for d in (ssh, home, ray_tmp):
        d.mkdir(mode=0o700)
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "echo-rd-test",
                        "-f", str(ssh / key)], check=True)
    (ssh / "authorized_keys").write_text((ssh / "user.pub").read_text())
    config = f"""\
ListenAddress 127.0.0.1
Port {{port}}
HostKey {ssh / 'host'}
AuthorizedKeysFile {ssh / 'authorized_keys'}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
"""
    # The head's account: root with `home` as its home directory (sshd starts sessions there and
    # sets HOME from the passwd entry), and the Python running this test on its login PATH.
    passwd = "".join(re.sub(r"^(root:[^:]*:0:0:[^:]*:)[^:]*:", rf"\g<1>{home}:", line)
                     for line in Path("/etc/passwd").read_text().splitlines(keepends=True))
    (ssh / "passwd").write_text(passwd)
    (home / ".bashrc").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    Path("/tmp/ray").mkdir(exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)        # sshd's privilege separation directory
    inside = (f"mount --bind {ssh / 'passwd'} /etc/passwd && "
              f"mount --bind {ray_tmp} /tmp/ray && "
              f"exec /usr/sbin/sshd -D -e -f {ssh / 'sshd_config'}")
    log = ssh / "sshd.log"
    started: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        (ssh / "sshd_config").write_text(config.format(port=port))
        with open(log, "ab") as err:
            started.append(subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation",
                 "private", "--kill-child", "sh", "-c", inside],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True))
        return started[-1]

    namespace = None
    proc = None
    try:
        # On a free port, started again on another if another process took it meanwhile.
        proc, port = serve(start, log, what="sshd", timeout=20)
        child = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
        namespace = os.readlink(f"/proc/{child}/ns/pid")
        (ssh / "relay.py").write_text(RELAY)
        yield {"home": home, "key": ssh / "user", "port": port,
               "proxy": f"{sys.executable} {ssh / 'relay.py'} %h {port}"}
    finally:
        # unshare ignores SIGTERM while it waits; killed, it takes sshd (--kill-child), the
        # namespace's first process, and the kernel then ends everything else in the namespace.
        if proc is not None:
            proc.kill()
            proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while namespace and _in_namespace(namespace) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (namespace and _in_namespace(namespace)), "the head's processes outlived it"


def _launcher_state() -> Path:
    """Where Ray's cluster launcher keeps a local cluster's node list and lock on this machine
    (Ray's temp folder: /tmp/ray unless RAY_TMPDIR or TMPDIR say otherwise)."""
    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:                       # a private module: it moved
        return Path("/tmp/ray")
    return Path(get_default_ray_temp_dir())


def _in_namespace(namespace: str) -> list[str]:
    """Processes (pids) in the PID namespace `namespace` (as /proc/<pid>/ns/pid reads)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "pid") == namespace:
                pids.append(entry.name)
        except OSError:
            pass                                  # ended meanwhile
    return pids


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": "", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{' '.join(result.args)} failed ({result.returncode}):\n" \
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _trial_reports(home: Path) -> dict[str, int]:
    """Per trial, how many results Tune has recorded (one line per reported epoch)."""
    return {p.parent.name: len(p.read_text().splitlines())
            for p in (home / "ray_results").rglob("result.json")}


@pytest.mark.slow
def test_ray_up_submit_down_on_an_onprem_cluster_over_ssh(tmp_path: Path, ssh_head):
    from mlflow.tracking import MlflowClient

    # The user's checkout: the project code, tiny params, the data prepared here.
    project = tmp_path / "project"
    for name in ("echo", "pipeline", "stages"):
        shutil.copytree(REPO / name, project / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section] = {**params[section], **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _ok(_cli([sys.executable, "-m", "stages.prepare"], project))

    # The shipped YAML with this "lab's" head: 127.0.0.1 alone, the throwaway key and SSH port,
    # and Ray's ports picked free (other Ray instances may run on this machine).
    config = _load("cluster-onprem.yaml")
    config["cluster_name"] = f"echo-rd-test-{uuid.uuid4().hex[:8]}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(ssh_head["key"]),
                      "ssh_proxy_command": ssh_head["proxy"]}
    # The cluster's Ray token, as `python -m pipeline.cluster_auth` makes it, from a throwaway
    # home (the head then runs in token mode and the driver finds the token at ~/.ray/auth_token).
    from pipeline.cluster_auth import RAY_TOKEN, ensure_token
    token, _ = ensure_token(tmp_path / "local-home")
    config["file_mounts"] = {t: (str(token) if s == RAY_TOKEN else s)
                             for t, s in config["file_mounts"].items()}
    gcs, dashboard, agent = free_ports(3)
    start = [c for c in config["head_start_ray_commands"] if "--port=6379" in c]
    assert len(start) == 1
    config["head_start_ray_commands"] = [
        c.replace("--port=6379", f"--port={gcs} --dashboard-port={dashboard} "
                                 f"--dashboard-agent-listen-port={agent}")
        for c in config["head_start_ray_commands"]]
    cluster = project / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(config, sort_keys=False))

    home = ssh_head["home"]
    submit = ["ray", "submit", str(cluster), "stages/sweep.py", "--", "--params", "params.yaml",
              "--verbose", "0"]
    try:
        _ok(_cli(["ray", "up", "-y", "--no-config-cache", str(cluster)], project))
        assert (home / "params.yaml").read_text() == (project / "params.yaml").read_text()
        assert (home / "pipeline" / "sweep" / "run.py").is_file()

        log = _ok(_cli(submit, project))
        assert "4 trials (4 completed)" in log, log[-3000:]
        table = pd.read_csv(home / "results" / "sweep.csv")
        assert len(table) == 4 and set(table["status"]) == {"completed"}
        assert all((home / p).is_file() for p in table["checkpoint"]), table["checkpoint"]
        client_ = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        experiment = client_.get_experiment_by_name(params["tracking"]["experiment"])
        runs = client_.search_runs([experiment.experiment_id])
        children = [r for r in runs if r.data.tags.get("echo.role") == "trial"]
        assert sorted(r.info.run_id for r in children) == sorted(table["mlflow_run_id"])
        reports = _trial_reports(home)
        assert len(reports) == 4 and set(reports.values()) == {2}      # 2 epochs each

        # Submitting again resumes the finished sweep: nothing is trained again.
        log = _ok(_cli(submit, project))
        assert "4 trials (4 completed)" in log, log[-3000:]
        assert _trial_reports(home) == reports
        again = pd.read_csv(home / "results" / "sweep.csv")
        pd.testing.assert_frame_equal(again.sort_values("trial_id").reset_index(drop=True),
                                      table.sort_values("trial_id").reset_index(drop=True))
        runs = client_.search_runs([experiment.experiment_id])
        assert len([r for r in runs if r.data.tags.get("echo.role") == "trial"]) == 4
    finally:
        down = _cli(["ray", "down", "-y", str(cluster)], project, timeout=120)
        # The launcher's local state for this cluster: its node list and lock, and the folder
        # of its SSH control sockets (ray/autoscaler/_private/command_runner.py names it).
        for leftover in _launcher_state().glob(f"cluster-{config['cluster_name']}.*"):
            leftover.unlink()
        digest = [hashlib.sha256(s.encode()).hexdigest()[:10]
                  for s in (getpass.getuser(), config["cluster_name"])]
        shutil.rmtree(Path("/tmp", f"ray_ssh_{digest[0]}", digest[1]), ignore_errors=True)
    _ok(down)
    # `ray down` stopped the head's Ray (the fixture's namespace would end it anyway).
    assert "raylet" not in _ok(_cli(["ssh", "-i", str(ssh_head["key"]), "-o",
                                     f"ProxyCommand={ssh_head['proxy']}", "-o",
                                     "StrictHostKeyChecking=no", "-o",
                                     "UserKnownHostsFile=/dev/null", "root@127.0.0.1",
                                     "ps -eo comm"], project, timeout=60))
