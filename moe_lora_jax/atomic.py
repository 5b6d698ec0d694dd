"""The one writer of every output: atomic, never overwriting, with the user's umask.

Every file or directory a command writes is first built under a temporary sibling
name and then moved into place in one step, so a failure or a kill never leaves a
half-written output. Outputs are never replaced unless the caller says so
(`overwrite=True` / `replace=True`, used only for a run's own results):

    check_new_file(path)                  # call before slow work: fail early if `path` exists
    write_json_atomic(path, obj)          # JSON, refuses NaN unless allow_nan
    atomic_write_text(path, text)
    with atomic_file(path) as tmp: fig.savefig(tmp)
    with atomic_dir(out_dir) as tmp: ...  # a directory that appears only when complete
    with run_lock(out_dir): ...           # one process at a time in a run directory

Temporary names are `.NAME.partial-HOST-PID-XXXX`; a later write of the same output
removes those left by dead processes on this host (a killed `convert`, say).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from moe_lora_jax.errors import MoeLoraError


# ----------------------------------------------------------------------------- permissions
def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask alone must set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (and everything under it) the modes of a normally created file or directory.

    mkstemp/mkdtemp (and safetensors) create 0600/0700; results must be readable as the umask allows.
    """
    umask = current_umask()
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                full = os.path.join(root, f)
                if not os.path.islink(full):
                    os.chmod(full, 0o666 & ~umask)
        os.chmod(path, 0o777 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


# ----------------------------------------------------------------------------- checks
def check_new_file(path: str | os.PathLike) -> Path:
    """Raise unless `path` can be created (call it before long work, so a clash fails early)."""
    path = Path(path)
    if path.is_dir():
        raise MoeLoraError(f"{path} is a directory: give a file name for the output")
    if path.exists() or path.is_symlink():
        raise MoeLoraError(f"{path} already exists: choose a new file name or remove it first")
    return path


def ensure_new_dir(out_dir: str | os.PathLike) -> Path:
    """Raise unless `out_dir` is absent or an empty directory (call it before long work)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeLoraError(f"{out} already exists and is not empty: choose a new output directory or remove it first")
    return out


# ----------------------------------------------------------------------------- leftovers
_PARTIAL = re.compile(r"\.partial-(?P<host>.+)-(?P<pid>\d+)-[^-]*$")


def _partial_prefix(path: Path) -> str:
    return f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` that dead processes on this host left behind.

    Those of live processes, of other hosts, or of unknown origin are left alone (ignored).
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    host = socket.gethostname()
    for entry in path.parent.glob(f".{glob_escape(path.name)}.partial-*"):
        m = _PARTIAL.search(entry.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# ----------------------------------------------------------------------------- files
def publish_file(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Move the finished temporary file `tmp` to `path`, with the permissions of a normally created file.

    Without `overwrite` the file is hard-linked into place, which fails atomically if `path`
    appeared meanwhile; an existing `path` is never replaced.
    """
    path = Path(path)
    apply_umask(tmp)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise MoeLoraError(f"{path} already exists: choose a new file name or remove it first") from None
    except OSError:  # no hard links on this filesystem: the existence check has to do
        check_new_file(path)
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling file name; on success it becomes `path` (see `publish_file`)."""
    path = Path(path)
    if path.is_dir():
        raise MoeLoraError(f"{path} is a directory: give a file name for the output")
    if not overwrite:
        check_new_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_file(tmp, path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    with atomic_file(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write `text` to the new file `path` through a temporary file (`overwrite` replaces an existing one)."""
    return atomic_write_bytes(path, text.encode(), overwrite=overwrite)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, overwrite: bool = False, allow_nan: bool = False,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """json.dump `obj` to `path` atomically; NaN is refused unless `allow_nan`; never replaces unless `overwrite`."""
    path = Path(path)
    try:
        text = json.dumps(obj, indent=2, allow_nan=allow_nan, default=default) + "\n"
    except ValueError as e:
        raise MoeLoraError(f"cannot write {path}: {e} (replace NaN/inf by null first)") from None
    if path.is_dir():
        raise MoeLoraError(f"{path} is a directory: give a file name for the JSON output")
    return atomic_write_text(path, text, overwrite=overwrite)


# ----------------------------------------------------------------------------- directories
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False  # the filesystem cannot exchange: fall back to two renames
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `out_dir` only on success.

    Refuses an `out_dir` that exists and is not empty, unless `replace`: then the old
    directory is swapped out in one step (two renames where the filesystem cannot swap)
    and removed after. Files get the umask's modes, not mkdtemp's 0700.
    """
    out = Path(out_dir)
    if not replace:
        ensure_new_dir(out)
    elif out.exists() and not out.is_dir():
        raise MoeLoraError(f"{out} is a file: remove it, or choose another output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if replace and out.exists():
            if not _exchange(tmp, out):
                old = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
                os.replace(out, old / out.name)  # out is absent only between these two renames
                os.replace(tmp, out)
                tmp = old
        else:
            if out.exists():
                ensure_new_dir(out)  # still empty?
                out.rmdir()
            try:
                os.rename(tmp, out)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise MoeLoraError(f"{out} appeared while it was being written: choose a new output directory") from None
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- run lock
LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # run directory -> depth, for the locks this process holds


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on `out_dir` (flock on OUT_DIR/.lock) or raise naming its holder.

    The OS drops a flock when its process dies, so a crashed run's leftover file never
    blocks. Re-entrant within one process (quickstart locks, then calls train).
    """
    import fcntl

    out = Path(out_dir)
    key = str(out.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield out / LOCK_NAME
        finally:
            _held[key] -= 1
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MoeLoraError(
                f"{out} is in use by another {what} ({holder}): wait for it to end, or choose another output directory"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _held[key] = 1
    try:
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the unlock: a waiting process re-checks the inode
        os.close(fd)
