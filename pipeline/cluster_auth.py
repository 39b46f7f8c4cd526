"""The Ray cluster's own credentials, made on the machine that runs `ray up` if they are missing:

- `~/.ssh/echo-rd-cluster` (+ `.pub`): an ed25519 key used only for the cluster's nodes. Both
  cluster YAMLs name it as `auth.ssh_private_key`; Ray's launcher copies it to the head (as
  `~/ray_bootstrap_key.pem`, so that the head can reach the workers), which is why it must never
  be your own key: whoever gets onto the head gets this key, and only the cluster's boxes
  accept it. It has no passphrase (`ray up` and the head's autoscaler log in unattended).
- `~/.config/echo-rd/ray-cluster-token`: the shared secret of Ray's token authentication
  (`RAY_AUTH_MODE=token`): the YAMLs copy it to Ray's token path on every node
  (`~/.ray/auth_token`) and start Ray in token mode, so that a client without it is refused.

    python -m pipeline.cluster_auth          # make what is missing, print where both are

Then, once per cluster, let the boxes accept the key: append `~/.ssh/echo-rd-cluster.pub` to
`~/.ssh/authorized_keys` of `ssh_user` on every box (cluster-onprem.yaml), or import it into AWS
as key pair `echo-rd-cluster` (cluster.yaml; the command is printed).

Refused, in one line naming the file and the fix: a key or token readable by other users, an
empty or short token, a file that is not an OpenSSH private key, and a key that is one of your
own (`~/.ssh/id_*` or any other key pair in `~/.ssh`).
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

KEY_NAME = "echo-rd-cluster"
SSH_KEY = f"~/.ssh/{KEY_NAME}"
RAY_TOKEN = "~/.config/echo-rd/ray-cluster-token"
TOKEN_BYTES = 32                     # 64 hex characters
MIN_TOKEN_CHARS = 32


class ClusterAuthError(Exception):
    """A credential file that cannot be used; the message is one line naming it and the fix."""


def _home(home: str | Path | None) -> Path:
    return Path(home) if home is not None else Path.home()


def ssh_key_path(home: str | Path | None = None) -> Path:
    return _home(home) / SSH_KEY.removeprefix("~/")


def token_path(home: str | Path | None = None) -> Path:
    return _home(home) / RAY_TOKEN.removeprefix("~/")


def _check_private(path: Path, what: str) -> None:
    mode = path.stat().st_mode
    if path.is_symlink() or not stat.S_ISREG(mode):
        raise ClusterAuthError(f"{path}: the {what} must be a plain file (not a link or folder); "
                               f"move it away and run `python -m pipeline.cluster_auth` again")
    if mode & 0o077:
        raise ClusterAuthError(f"{path}: the {what} is readable by other users "
                               f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")


def _ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise ClusterAuthError("ssh-keygen not found: install openssh-client (Debian/Ubuntu: "
                               "apt-get install openssh-client) and run this again")
    return path


def _public_key(private: Path) -> str:
    """`type base64` of the key pair (read from the private key itself)."""
    result = subprocess.run([_ssh_keygen(), "-y", "-P", "", "-f", str(private)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise ClusterAuthError(f"{private}: not a usable OpenSSH private key without passphrase "
                               f"({reason}); move it away and run `python -m "
                               f"pipeline.cluster_auth` again to make a new one")
    return " ".join(result.stdout.split()[:2])


def _own_keys(ssh_dir: Path, ours: Path) -> dict[str, Path]:
    """{`type base64`: file} of every other public key in ~/.ssh (the user's own keys)."""
    keys = {}
    for pub in sorted(ssh_dir.glob("*.pub")) if ssh_dir.is_dir() else []:
        if pub.name == ours.name + ".pub":
            continue
        try:
            parts = pub.read_text().split()
        except (OSError, UnicodeDecodeError):
            continue
        if len(parts) >= 2:
            keys[" ".join(parts[:2])] = pub
    return keys


def ensure_ssh_key(home: str | Path | None = None) -> tuple[Path, bool]:
    """The cluster's SSH key, made if missing; (path, made now)."""
    key = ssh_key_path(home)
    made = False
    if not key.exists() and not key.is_symlink():
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        result = subprocess.run([_ssh_keygen(), "-q", "-t", "ed25519", "-N", "", "-C", KEY_NAME,
                                 "-f", str(key)], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ClusterAuthError(f"{key}: ssh-keygen failed ({result.stderr.strip()}); check "
                                   f"that {key.parent} is writable")
        made = True
    _check_private(key, "cluster's SSH key")
    public = _public_key(key)
    own = _own_keys(key.parent, key).get(public)
    if own is not None:
        raise ClusterAuthError(f"{key}: this is your own key (the same as {own}); the cluster "
                               f"needs a key of its own: move {key} away and run `python -m "
                               f"pipeline.cluster_auth` again")
    pub = key.with_name(key.name + ".pub")
    if not pub.exists() or " ".join(pub.read_text().split()[:2]) != public:
        pub.write_text(f"{public} {KEY_NAME}\n")
    return key, made


def ensure_token(home: str | Path | None = None) -> tuple[Path, bool]:
    """Ray's auth token for the cluster, made if missing; (path, made now)."""
    path = token_path(home)
    made = False
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(TOKEN_BYTES))
        made = True
    _check_private(path, "Ray auth token")
    token = path.read_text().strip()
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or any(c.isspace() for c in token):
        raise ClusterAuthError(f"{path}: not a usable Ray auth token (empty, short or not one "
                               f"word); remove it and run `python -m pipeline.cluster_auth` "
                               f"again to make a new one")
    return path, made


def ensure(home: str | Path | None = None) -> dict[str, tuple[Path, bool]]:
    return {"ssh_key": ensure_ssh_key(home), "ray_token": ensure_token(home)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster_auth",
                                     description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        made = ensure()
    except ClusterAuthError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (key, key_new), (token, token_new) = made["ssh_key"], made["ray_token"]
    state = {True: "made now", False: "already there"}
    print(f"cluster SSH key:  {key} ({state[key_new]}); public part {key}.pub")
    print(f"Ray auth token:   {token} ({state[token_new]}); never commit or share it")
    print(f"on-premise boxes: append {key}.pub to ~/.ssh/authorized_keys of ssh_user on every box")
    print(f"AWS (once per region): aws ec2 import-key-pair --key-name {KEY_NAME} "
          f"--public-key-material fileb://{key}.pub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
