"""A sweep's Tune experiment folder, `<sweep.storage_path>/<sweep.name>`: where it is, the lock
one driver holds while it runs it, the uid + settings (STATE_FILE) that decide whether a
rerun resumes it or archives it and starts anew, and the signing of the state Tune pickles
into it (`signed_storage`).

Tune's restore unpickles files of the experiment folder (`tuner.pkl`, `searcher-state-*.pkl`,
`search_gen_state-*.json`, `experiment_state-*.json` with pickled values): anyone who can
write there (a shared NFS or S3 folder, as docs/sweep.md recommends for clusters) could run
code in the driver. Every such file Tune writes goes through `SignedStateFileSystem`, which
prefixes it with an HMAC-SHA256 under a key kept outside the experiment folder
(`state_key_file()`: `$ECHO_STATE_KEY_FILE`, default `~/.config/echo-rd/sweep-state.key`,
created 0600 on first use), and every such file Tune reads back is verified before one byte
of it reaches a pickle: a file without a valid signature is refused (`verify_experiment_state`
names it in one line before Tune is called).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import posixpath
import secrets
import socket
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs
from pydantic import BaseModel

from echo.files import file_digest
from echo.methods import METHODS, method_options
from pipeline.config import DataParams, Params, SweepParams, TrainParams, is_free
from pipeline.sweep.errors import SweepError, SweepLocked, unwritable

STATE_FILE = "echo_sweep.json"     # beside Ray's state in <storage>/<name>: uid + settings


def fingerprint(params: Params, root: Path | None = None) -> dict:
    """The settings that decide what a sweep's trials are, in full (defaults included, so that a
    later change of a default is seen): a stored experiment is resumed only if these are the
    same settings (`same_settings`). Every field of the data:, train: and sweep: sections but
    those declared free to change on resume (pipeline.config `free`, echo.settings
    `resume_free`: device, CUDA graphs, resources, checkpointing...), the options of the
    sweep's methods, and with `root` the prepared data file's content (DVC re-runs the sweep
    when the prepare stage wrote new data under unchanged params)."""
    data_sha256 = None
    prepared = (root / params.data.prepared_path) if root is not None else None
    if prepared is not None and prepared.exists():
        data_sha256 = file_digest(prepared, "sha256")
    return {"data": {**_bound(params.data), "prepared_sha256": data_sha256},
            "train": _bound(params.train),
            "method_options": {m: {**method_options(m), **params.options_of(m)}
                               for m in params.sweep.methods},
            "sweep": _bound(params.sweep)}


def _bound(model) -> dict:
    """A section's values, but its fields declared free."""
    return model.model_dump(exclude={name for name, info in type(model).model_fields.items()
                                     if is_free(info)})


# The schema of each section of a fingerprint, for `comparable`.
SECTIONS = {"data": DataParams, "train": TrainParams, "sweep": SweepParams}


def comparable(settings: dict) -> dict:
    """A fingerprint as it is compared: every value at its current default left out, and every
    field declared free, so that a new setting (absent from an older fingerprint), a default
    written out in params.yaml, or a newly freed field archives no stored sweep; a value that
    differs from today's default is kept, so a fingerprint written before a default changed
    differs from one of the new default. Method options likewise against each method's
    defaults, for the sweep's methods only. Works on fingerprints stored by older versions."""
    out = {}
    for section, values in settings.items():
        schema = SECTIONS.get(section)
        if schema is not None and isinstance(values, dict):
            out[section] = _non_default(schema, values)
        elif section == "method_options" and isinstance(values, dict):
            out[section] = _options_non_default(values, settings.get("sweep", {}))
        else:
            out[section] = values
    return out


def _non_default(schema, values: dict, defaults: dict | None = None) -> dict:
    """`values` of a section (`schema`) without its free fields and the values at their
    defaults (`defaults`: a nested section's own, else the schema's), nested sections alike."""
    kept = {}
    for name, value in values.items():
        info = schema.model_fields.get(name)
        if info is None:                    # a field that no longer exists: keep it
            kept[name] = value
            continue
        if is_free(info):
            continue
        default = defaults[name] if defaults is not None and name in defaults else \
            info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel) and isinstance(value, dict):
            nested = _non_default(type(default), value, dict(default))
            if nested:
                kept[name] = nested
            continue
        if not _same(value, default.model_dump() if isinstance(default, BaseModel) else default):
            kept[name] = value
    return kept


def _options_non_default(options: dict, sweep: dict) -> dict:
    methods = sweep.get("methods", SweepParams.model_fields["methods"].default)
    kept = {}
    for method, values in options.items():
        if method not in methods or method not in METHODS:
            continue                        # not trained by this sweep
        defaults = method_options(method)
        changed = {k: v for k, v in (values or {}).items()
                   if k not in defaults or not _same(v, defaults[k])}
        if changed:
            kept[method] = changed
    return kept


def _same(a, b) -> bool:
    """Equal as JSON would store them (a stored fingerprint has been through JSON)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def same_settings(stored: dict | None, settings: dict) -> bool:
    """Whether a stored experiment's fingerprint stands for the same trials as `settings`."""
    return stored is not None and _same(comparable(stored), comparable(settings))


def storage_uri(params: Params, root: Path) -> str:
    """Ray needs an absolute storage path; URIs (s3://, gs://) are used as they are."""
    path = params.sweep.storage_path
    return path if "://" in path else str((root / path).resolve())


@contextlib.contextmanager
def experiment_lock(storage: str, name: str):
    """Hold `<storage>/.<name>.lock` (an OS lock: released when the process ends, however it
    ends) while this driver runs the experiment; SweepLocked, naming the holder, if another
    driver holds it. DVC's lock covers `dvc repro` only, not `python -m stages.sweep` or `ray
    submit` beside it: two drivers would train into one Tune experiment and log every MLflow
    epoch twice. A URI storage (s3://) has no such lock: nothing is held there."""
    if "://" in storage:
        yield
        return
    from filelock import FileLock, Timeout
    folder = Path(storage)
    lock = FileLock(str(folder / f".{name}.lock"), timeout=0)
    owner = folder / f".{name}.owner.json"        # the lock file itself is truncated on open
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        who = lock_owner(owner) or f"holding {folder / f'.{name}.lock'}"
        raise SweepLocked(f"sweep {name!r} is already running in another driver ({who}); wait "
                          f"for it to end (or stop it) and run the stage again") from None
    except OSError as err:
        # Taken before the output probes (pipeline.sweep.checks.check_writable): a read-only or full
        # storage folder is refused here, in the probes' words.
        raise unwritable("sweep.storage_path", folder, err) from None
    try:
        try:
            tmp = owner.with_name(owner.name + ".tmp")
            tmp.write_text(json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": " ".join(getattr(sys, "orig_argv", None) or ["python", *sys.argv])}))
            os.replace(tmp, owner)
        except OSError as err:
            raise unwritable("sweep.storage_path", folder, err) from None
        yield
    finally:
        lock.release()



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                        # someone else's process, but alive
    return True


def lock_owner(owner: Path, wait: float = 5.0) -> str | None:
    """Who holds an experiment lock, from its owner file: "pid P on HOST, since T: COMMAND".
    The holder writes the file just after it took the lock, so a driver refused in between
    finds none yet (or a dead driver's): it waits up to `wait` seconds for the file to name a
    live process other than itself (on this host; another host's pid cannot be checked).
    None if none appears."""
    deadline = time.monotonic() + wait
    while True:
        try:
            held = json.loads(owner.read_text())
            pid = int(held["pid"])
            here = held["host"] == socket.gethostname()
            if not here or (pid != os.getpid() and _alive(pid)):
                return (f"pid {held['pid']} on {held['host']}, since {held['started']}: "
                        f"{held['command']}")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _stored(experiment: str, key: str):
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment if "://" in experiment
                                              else Path(experiment).as_uri())
    try:
        with fs.open_input_stream(f"{path}/{STATE_FILE}") as fh:
            return json.loads(fh.read().decode())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stored_uid(experiment: str) -> str | None:
    """The uid in an experiment folder's STATE_FILE, None if it has none."""
    return _stored(experiment, "uid")


def stored_settings(experiment: str) -> dict | None:
    """The settings (`fingerprint`) an experiment folder was started with, None if unknown."""
    return _stored(experiment, "settings")


def experiment_uid(experiment: str, settings: dict) -> tuple[str, bool]:
    """(uid, resumable) of the experiment folder `<storage_path>/<name>`.

    The folder is resumed only if it was started with the same `settings` (`fingerprint`);
    otherwise it is kept under `<name>@<its uid>` and a fresh experiment (new uid, hence a new
    MLflow parent run) starts, so that `dvc repro` after a params change just works."""
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment if "://" in experiment
                                              else Path(experiment).as_uri())
    state_path = f"{path}/{STATE_FILE}"
    if fs.get_file_info(state_path).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(state_path) as fh:
            stored = json.loads(fh.read().decode())
        if same_settings(stored["settings"], settings):
            return stored["uid"], True
        before, now = comparable(stored["settings"]), comparable(settings)
        changed = sorted(k for k in {**before, **now} if not _same(now.get(k), before.get(k)))
        archive = f"{path}@{stored['uid'][:8]}"
        fs.move(path, archive)
        print(f"note: {experiment} was started with other {'/'.join(changed)} params; kept it "
              f"as {archive} and starting a new sweep", flush=True)
    elif fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        raise SweepError(f"{experiment} exists but was not written by this sweep stage "
                         f"(no {STATE_FILE}); choose another sweep.name or remove that folder")
    uid = uuid.uuid4().hex
    fs.create_dir(path)
    with fs.open_output_stream(state_path + ".tmp") as fh:
        fh.write(json.dumps({"uid": uid, "settings": settings}, indent=1).encode())
    fs.move(state_path + ".tmp", state_path)
    return uid, False


# ---------------------------------------------------------------------------------------------
# Signed experiment state
# ---------------------------------------------------------------------------------------------

KEY_FILE_ENV = "ECHO_STATE_KEY_FILE"
DEFAULT_KEY_FILE = "~/.config/echo-rd/sweep-state.key"
# A failed trial's exception, pickled by the driver into the trial's folder; Tune unpickles it
# when it builds its results.
TRIAL_ERROR_PICKLE = "error.pkl"
SIGNATURE_MAGIC = b"echo-rd-hmac-sha256:"     # + 64 hex digits + b"\n" + the file's bytes


class StateSignatureError(OSError):
    """A file of the experiment's Tune state is unsigned or its signature does not match."""


def state_key_file() -> Path:
    """Where the key that signs experiment state lives: outside every experiment folder."""
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE).expanduser().resolve()


def state_key(path: Path | None = None) -> bytes:
    """The signing key (32 random bytes, hex in `path`); created, readable by its owner only,
    the first time."""
    path = path or state_key_file()
    for _ in range(2):
        try:
            key = bytes.fromhex(path.read_text().strip())
            if len(key) < 16:
                raise ValueError("too short")
            return key
        except FileNotFoundError:
            # Written whole under a name of its own, then linked into place: a driver starting
            # at the same moment reads either no key or the whole key, never an empty file.
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                with contextlib.suppress(FileExistsError):     # another driver's came first
                    os.link(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except ValueError:
            raise SweepError(f"{path}: not a state signing key (64 hex digits); remove it (a new "
                             f"key is made, and experiments signed with the old one no longer "
                             f"resume) or set ${KEY_FILE_ENV} to the right file") from None
    return bytes.fromhex(path.read_text().strip())


def is_state_file(name: str) -> bool:
    """The files at the top of an experiment folder that Tune's restore reads (it downloads
    every `*.json` and `*.pkl` there), except STATE_FILE (plain JSON, read by `json` here)."""
    return name.endswith((".json", ".pkl")) and name != STATE_FILE


def _mac(key: bytes, name: str, data: bytes) -> str:
    return hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def sign_state(key: bytes, name: str, data: bytes) -> bytes:
    return SIGNATURE_MAGIC + _mac(key, name, data).encode() + b"\n" + data


def unsign_state(key: bytes, name: str, signed: bytes, where: str) -> bytes:
    """The bytes of a signed state file; StateSignatureError if it is not signed by `key`."""
    head = len(SIGNATURE_MAGIC) + 65
    if not signed.startswith(SIGNATURE_MAGIC) or signed[head - 1:head] != b"\n":
        raise StateSignatureError(f"{where}: not signed by this project's sweep driver")
    mac, data = signed[len(SIGNATURE_MAGIC):head - 1].decode("ascii", "replace"), signed[head:]
    if not hmac.compare_digest(mac, _mac(key, name, data)):
        raise StateSignatureError(f"{where}: its signature does not match its content (changed "
                                  f"after this project's sweep driver wrote it, or signed with "
                                  f"another key than {state_key_file()})")
    return data


class _SigningWriter(io.RawIOBase):
    """Collects what Tune writes to a state file; on close writes it signed, in one write."""

    def __init__(self, handler: "SignedStateFileSystem", path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.buffer = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def close(self) -> None:
        if not self.closed:
            data = sign_state(self.handler.key, posixpath.basename(self.path),
                              self.buffer.getvalue())
            # Whole or not at all: a write that fails (a full disk) keeps the previous version,
            # instead of a truncated file that no longer verifies (or unpickles).
            base, tmp = self.handler.base, f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with base.open_output_stream(tmp, metadata=self.metadata) as out:
                    out.write(data)
                base.move(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    base.delete_file(tmp)
                raise
        super().close()


class SignedStateFileSystem(pyarrow.fs.FileSystemHandler):
    """A pyarrow file system (`pyarrow.fs.PyFileSystem(SignedStateFileSystem(...))`) over the
    storage's own, for Tune's `storage_filesystem`: the state files (`is_state_file`) at the
    top of `experiment` are signed when written and verified when read; everything else (the
    trials' checkpoints, written by the workers, which need no key) passes through. The key is
    read from `key_file` when first needed, never pickled: Tune pickles this file system into
    its experiment state."""

    def __init__(self, base: pyarrow.fs.FileSystem, experiment: str, key_file: str):
        self.base, self.key_file = base, key_file
        self.experiment = posixpath.normpath(experiment)
        self._key: bytes | None = None

    def __reduce__(self):
        return SignedStateFileSystem, (self.base, self.experiment, self.key_file)

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = state_key(Path(self.key_file))
        return self._key

    def _state(self, path: str) -> bool:
        parent, name = posixpath.split(posixpath.normpath(path))
        return (parent == self.experiment and is_state_file(name)) or \
            (posixpath.dirname(parent) == self.experiment and name == TRIAL_ERROR_PICKLE)

    def __eq__(self, other):
        return isinstance(other, SignedStateFileSystem) and \
            (self.base, self.experiment) == (other.base, other.experiment)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return f"echo-signed+{self.base.type_name}"

    def normalize_path(self, path):
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.base.delete_file(path)

    def move(self, src, dest):
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        if self._state(src) or self._state(dest):
            with self.open_input_stream(src) as fh:
                data = fh.read()
            with self.open_output_stream(dest, None) as out:
                out.write(data)
        else:
            self.base.copy_file(src, dest)

    def _verified(self, path):
        with self.base.open_input_stream(path) as fh:
            signed = fh.read()
        return pyarrow.BufferReader(unsign_state(self.key, posixpath.basename(path), signed,
                                                 path))

    def open_input_stream(self, path):
        return self._verified(path) if self._state(path) else self.base.open_input_stream(path)

    def open_input_file(self, path):
        return self._verified(path) if self._state(path) else self.base.open_input_file(path)

    def open_output_stream(self, path, metadata):
        if self._state(path):
            return pyarrow.PythonFile(_SigningWriter(self, path, metadata), mode="w")
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        if self._state(path):
            raise StateSignatureError(f"{path}: a signed state file cannot be appended to")
        return self.base.open_append_stream(path, metadata=metadata)


def signed_storage(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(file system, path in it) of the storage `storage` (a folder or a URI) whose experiment
    `name`'s state files are signed and verified: Tune's `storage_filesystem` and
    `storage_path`."""
    base, path = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage
                                                else Path(storage).as_uri())
    handler = SignedStateFileSystem(base, f"{path.rstrip('/')}/{name}", str(state_key_file()))
    return pyarrow.fs.PyFileSystem(handler), path


def verify_experiment_state(experiment: str) -> None:
    """Every state file Tune's restore would unpickle from `experiment` carries this project's
    signature; else SweepError in one line naming the file, before Tune reads anything."""
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment if "://" in experiment
                                              else Path(experiment).as_uri())
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    trials = [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory]
    errors = fs.get_file_info([f"{t}/{TRIAL_ERROR_PICKLE}" for t in trials]) if trials else []
    key = None
    for info in sorted(infos, key=lambda i: i.base_name) + errors:
        if info.type != pyarrow.fs.FileType.File or not (
                is_state_file(info.base_name) or info.base_name == TRIAL_ERROR_PICKLE):
            continue
        key = key or state_key()
        with fs.open_input_stream(info.path) as fh:
            signed = fh.read()
        try:
            unsign_state(key, info.base_name, signed,
                         f"{experiment}/{info.path[len(path):].lstrip('/')}")
        except StateSignatureError as err:
            raise SweepError(
                f"{err}; nothing was loaded from it (Tune would unpickle it, which can run "
                f"code). If this folder is yours and was written before state signing, sign it "
                f"with `python -m pipeline.sweep.experiment sign {experiment}`; otherwise move the "
                f"folder away and run the stage again (a new sweep starts)") from None


def sign_experiment(experiment: str) -> list[str]:
    """Sign the unsigned state files of an experiment folder its owner trusts (one written
    before state signing); returns their names."""
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment if "://" in experiment
                                              else Path(experiment).as_uri())
    key, signed = state_key(), []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    trials = [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory]
    errors = fs.get_file_info([f"{t}/{TRIAL_ERROR_PICKLE}" for t in trials]) if trials else []
    for info in infos + errors:
        if info.type != pyarrow.fs.FileType.File or not (
                is_state_file(info.base_name) or info.base_name == TRIAL_ERROR_PICKLE):
            continue
        with fs.open_input_stream(info.path) as fh:
            data = fh.read()
        if data.startswith(SIGNATURE_MAGIC):
            continue
        with fs.open_output_stream(info.path) as out:
            out.write(sign_state(key, info.base_name, data))
        signed.append(info.path[len(path):].lstrip("/"))
    return signed


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "sign":
        sys.exit("usage: python -m pipeline.sweep.experiment sign <storage_path>/<sweep.name>")
    names = sign_experiment(sys.argv[2])
    print(f"signed {len(names)} state file(s) of {sys.argv[2]}: {', '.join(names) or '-'}")
