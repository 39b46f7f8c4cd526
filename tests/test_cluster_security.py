"""What the cluster YAMLs expose, and to whom (issue 27 item 4; docs/reliability.md).

- Each YAML's head start command, run for real (`ray start --head` exactly as written, with
  free ports and a private temp dir), with the token the YAML mounts at Ray's token path: the
  head's GCS refuses a client without the token or with another one, and answers one with it.
- The SSH key is the cluster's own (`python -m pipeline.cluster_auth` makes it and the token,
  refuses the user's own key and world-readable files in one line), and both YAMLs use it.
- cluster.yaml lets Ray create no security group (Ray's default opens SSH to 0.0.0.0/0): every
  node type names the user's group, and the commands that make it open SSH to one CIDR only.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline import cluster_auth
from support import REPO
from support.processes import free_ports, kill_tree, naming, serve, stop
YAMLS = ("cluster.yaml", "cluster-onprem.yaml")
TOKEN_MOUNT_SOURCE = cluster_auth.RAY_TOKEN


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _image_home() -> str:
    """The home directory of the Dockerfile's user (useradd --create-home: /home/<user>)."""
    text = (REPO / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    assert re.search(rf"useradd\b[^\n]*--create-home[^\n]*\s{user}\s*$", text, re.M)
    return f"/home/{user}"


def _token_target(name: str) -> str:
    """Where the YAML puts Ray's token on the nodes (the mount whose source is the token)."""
    mounts = {t: s for t, s in _load(name)["file_mounts"].items() if s == TOKEN_MOUNT_SOURCE}
    assert len(mounts) == 1, f"{name} does not mount {TOKEN_MOUNT_SOURCE} onto the nodes"
    return next(iter(mounts))


PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"echo-rd-probe", None, timeout=20)
    print("OK")
except Exception as err:
    print("REFUSED", type(err).__name__)
"""


def _gcs_probes(address: str, secret: str, home: Path) -> dict[str, subprocess.Popen]:
    """Real GCS calls through Ray's own client (grpcio is not a Ray dependency), one process
    per case (Ray reads its auth mode once, at import), started together: no token (auth off on
    the client), another token, the cluster's token."""
    cases = {"none": {"RAY_AUTH_MODE": "disabled"},
             "other": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * len(secret)},
             "token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secret}}
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {case: subprocess.Popen([sys.executable, "-c", PROBE, address],
                                   env={**base, "HOME": str(home), **extra},
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for case, extra in cases.items()}


def _head_command(name: str, port: int, temp_dir: Path) -> str:
    """The YAML's head start command as the launcher runs it, on free ports and a private
    temp dir, in the foreground (`--block`); `ray stop` (which would stop every Ray on this
    machine) is left out. Every port a head listens on by default at a fixed number is moved
    to a free one (the GCS, the object manager cluster.yaml pins, the dashboard and its agent):
    another head may run on this machine (the other test worker's). (Ray's client server, on
    10001, needs ray[client], which the project does not install: it is not started.)"""
    commands = [c for c in _load(name)["head_start_ray_commands"] if c.strip() != "ray stop"]
    assert len(commands) == 1 and "ray start --head" in commands[0], commands
    command = commands[0].replace("--port=6379", f"--port={port}")
    assert f"--port={port}" in command
    objects, dashboard, agent = free_ports(3)
    command = re.sub(r"--object-manager-port=\d+", f"--object-manager-port={objects}", command)
    command = re.sub(r"--autoscaling-config=\S+", "", command)      # only on a launched head
    command = re.sub(r"ulimit -n \d+;\s*", "", command)             # may exceed this machine's
    return (f"{command} --temp-dir={shlex.quote(str(temp_dir))} --num-cpus=0 "
            f"--dashboard-port={dashboard} --dashboard-agent-listen-port={agent} "
            f"--disable-usage-stats --block")


@pytest.mark.slow
@pytest.mark.parametrize("name", YAMLS)
def test_yaml_head_refuses_clients_without_the_token(name, tmp_path):
    token_target = _token_target(name)
    home = tmp_path / "home"
    # The node's user: Ray's token path is ~/.ray/auth_token of the account Ray runs as (the
    # image's user on cluster.yaml's containers, ssh_user on the lab's boxes).
    default = "~/.ray/auth_token"
    if name == "cluster.yaml":
        assert token_target == f"{_image_home()}/.ray/auth_token", token_target
    else:
        assert token_target == default, token_target
    token = (home / ".ray" / "auth_token")
    token.parent.mkdir(parents=True)
    made, _ = cluster_auth.ensure_token(tmp_path / "local")       # what `ray up` copies
    shutil.copy(made, token)
    secret = token.read_text().strip()

    # Short (Unix socket paths are limited) and this test's own: its processes are found by it.
    temp_dir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    log_path = tmp_path / "head.log"
    heads: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            heads.append(subprocess.Popen(
                ["bash", "-c", _head_command(name, port, temp_dir / str(len(heads)))], env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return heads[-1]

    try:
        head, port = serve(start, log_path, what="the head's GCS", timeout=240)
        probes = _gcs_probes(f"127.0.0.1:{port}", secret, tmp_path / "client")
        answers = {case: p.communicate(timeout=240)[0].strip() for case, p in probes.items()}
        assert head.poll() is None, "the head ended during the probes (a loaded machine)"
        assert answers["token"] == "OK", answers
        assert answers["none"].startswith("REFUSED"), answers
        assert answers["other"].startswith("REFUSED"), answers
    finally:
        for head in heads:
            stop(head)
        # Ray's daemons left the group: they name this test's private temp dir on their command
        # line (matched as a whole path: another test's Ray is never touched).
        kill_tree(naming(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_starts_every_node_in_token_mode_with_the_dashboard_on_localhost(name):
    config = _load(name)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config[key] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token ray start" in command, command
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in (REPO / name).read_text()
    if name == "cluster.yaml":       # the driver `ray submit` starts in the container, too
        assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_uses_the_clusters_own_ssh_key(name):
    assert _load(name)["auth"]["ssh_private_key"] == cluster_auth.SSH_KEY
    if name == "cluster.yaml":       # AWS: the key pair the documented command imports
        for node_type in _load(name)["available_node_types"].values():
            assert node_type["node_config"]["KeyName"] == cluster_auth.KEY_NAME


def _run_auth(home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cluster_auth"], cwd=REPO,
                          env={**os.environ, "HOME": str(home)}, capture_output=True, text=True,
                          timeout=120)


def test_cluster_auth_makes_a_dedicated_key_and_token_once_and_refuses_bad_ones(tmp_path):
    if shutil.which("ssh-keygen") is None:
        from support.system_tools import require_tool
        require_tool("ssh-keygen", "openssh-client")
    home = tmp_path / "home"
    # The user's own key, which must never serve as the cluster's.
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(home / ".ssh" / "id_ed25519")], check=True)
    first = _run_auth(home)
    assert first.returncode == 0, first.stderr
    key = home / ".ssh" / "echo-rd-cluster"
    token = home / ".config" / "echo-rd" / "ray-cluster-token"
    assert "made now" in first.stdout and str(key) in first.stdout
    for path in (key, token):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    public = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                            text=True, check=True).stdout.split()[:2]
    assert (key.with_name("echo-rd-cluster.pub").read_text().split()[:2]) == public
    assert public != (home / ".ssh" / "id_ed25519.pub").read_text().split()[:2]
    before = key.read_bytes(), token.read_bytes()
    second = _run_auth(home)
    assert second.returncode == 0 and "already there" in second.stdout
    assert (key.read_bytes(), token.read_bytes()) == before           # kept, not remade

    token.chmod(0o644)
    refused = _run_auth(home)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert str(token) in refused.stderr and f"chmod 600 {token}" in refused.stderr
    token.chmod(0o600)

    # The user's own key copied into the cluster's place.
    key.unlink()
    key.with_name("echo-rd-cluster.pub").unlink()
    shutil.copy(home / ".ssh" / "id_ed25519", key)
    key.chmod(0o600)
    refused = _run_auth(home)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "your own key" in refused.stderr and str(home / ".ssh" / "id_ed25519.pub") in \
        refused.stderr


def test_aws_cluster_opens_ssh_to_one_cidr_only(monkeypatch):
    """With SecurityGroupIds on every node type, Ray's AWS bootstrap creates no group (its
    default group opens port 22 to 0.0.0.0/0): shown with Ray's own configuration step, which
    would call AWS to create one. The documented group admits SSH from one CIDR."""
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(_load("cluster.yaml"))

    def create(*args, **kwargs):
        raise AssertionError("Ray would create its default security group (SSH from anywhere)")

    monkeypatch.setattr(aws_config, "_upsert_security_groups", create)
    configured = aws_config._configure_security_group(config)
    for name, node_type in configured["available_node_types"].items():
        groups = node_type["node_config"]["SecurityGroupIds"]
        assert groups and all(g.startswith("sg-") for g in groups), name
    aws_config._configure_key_pair(config)              # KeyName given: no AWS call, no new key
    # Ray's own default rule, which the YAML avoids.
    assert {"CidrIp": "0.0.0.0/0"} in aws_config._create_default_ssh_inbound_rules()[0]["IpRanges"]
    text = (REPO / "cluster.yaml").read_text()
    rules = re.findall(r"authorize-security-group-ingress[^\n]*\\\n#\s*([^\n]*)", text)
    assert len(rules) == 2, rules
    ssh = [r for r in rules if "--port 22" in r]
    assert len(ssh) == 1 and re.search(r"--cidr YOUR-PUBLIC-IP/32", ssh[0]), ssh
    assert any("--source-group $SG" in r for r in rules)           # node to node only
    assert "0.0.0.0/0" not in text and "::/0" not in text
