"""Replace a set of files in an artifacts folder as one unit. A leaf.

``train`` writes a state_dict, metrics, plots and a manifest whose sha256s vouch for them. Renaming
them into place one by one leaves, if the process dies between two renames, a new state_dict beside
the old manifest. So the new set is written into a staging folder beside ``out`` (the files of
``out`` that are not replaced are hard-linked into it), and one ``renameat2(RENAME_EXCHANGE)`` swaps
the two folders: at every instant ``out`` is the old folder or the new one, whole.

Where the exchange is not possible (``out`` is a mount point, its parent is not writable, not Linux),
the staged folder is renamed to ``out/.train-commit`` (the commit point: it only gets that name when
complete) and its files are moved into place, the manifest last. A process that dies in that short
window leaves the journal behind, and :func:`finish_pending_commit` (run by the next ``train``, and
callable by any reader) rolls it forward.

Named fault points (``MNIST_DEPLOY_FAULT``, see ``faults.py``), in order:
``train:after-state-dict``, ``train:after-metrics``, ``train:after-plots``, ``train:before-manifest``
(called by the writer), ``train:before-commit``, ``train:after-commit`` (exchange), and in the
in-place fallback ``train:journaled`` and ``train:renamed-one``. ``train.py`` adds
``train:rank{R}:step`` (rank R, after the first optimizer step of each epoch).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import MnistDeployError
from ..faults import fault_point
from .files import fsync_dir, pid_alive

JOURNAL = ".train-commit"
_STAGING_TAG = ".train-"
_FORCE_INPLACE_ENV = "MNIST_DEPLOY_INPLACE_COMMIT"  # tests: exercise the fallback on any filesystem
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EBUSY, errno.ENOTSUP, errno.EPERM, errno.EMLINK)


class ArtifactWriteError(MnistDeployError):
    """The new artifacts could not be written (disk full, permissions); the previous set is unchanged."""

    exit_code = 1


@contextlib.contextmanager
def replace_set(out: str | os.PathLike, *, manifest_name: str = "manifest.json") -> Iterator[Path]:
    """Yield an empty staging folder; write the new files into it; on success they replace ``out``'s.

    Files in ``out`` that the new set does not name are kept. On any exception (KeyboardInterrupt
    included) the staging folder is removed and ``out`` is untouched; an ``OSError`` becomes an
    :class:`ArtifactWriteError` naming the folder and the cause.
    """
    out = Path(os.path.realpath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        finish_pending_commit(out, manifest_name=manifest_name)
        _remove_stale_staging(out)
        exchange = _can_exchange(out)
        where = out.parent if exchange else out
        where.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING_TAG}{os.getpid()}-", dir=where))
    except OSError as exc:
        raise _write_error(out, exc) from None
    try:
        yield staging
        _fsync_files(staging)
        if exchange:
            _commit_by_exchange(staging, out, manifest_name)
        else:
            _commit_in_place(staging, out, manifest_name)
    except OSError as exc:
        raise _write_error(out, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange it holds the previous set


def finish_pending_commit(out: str | os.PathLike, *, manifest_name: str = "manifest.json") -> bool:
    """Roll forward an in-place commit that a killed process left half done; True if there was one."""
    out = Path(out)
    journal = out / JOURNAL
    if not journal.is_dir():
        return False
    with _commit_lock(out):  # a live writer holds it for its few renames: wait, then look again
        if not journal.is_dir():
            return False
        names = sorted(p.name for p in journal.iterdir() if p.name != manifest_name)
        if (journal / manifest_name).exists():
            names.append(manifest_name)  # the manifest goes last: while it is in the journal, the commit is pending
        for name in names:
            os.replace(journal / name, out / name)
        fsync_dir(out)
        shutil.rmtree(journal, ignore_errors=True)
    return True


@contextlib.contextmanager
def _commit_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder for the in-place commit's renames; released when the
    holder exits, however it exits, so a reader never rolls forward under a live writer."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _can_exchange(out: Path) -> bool:
    if os.environ.get(_FORCE_INPLACE_ENV) or _renameat2() is None:
        return False
    if not out.exists():
        return os.access(out.parent, os.W_OK)
    try:
        same_fs = out.stat().st_dev == out.parent.stat().st_dev
    except OSError:
        return False
    return out.is_dir() and same_fs and not os.path.ismount(out) and os.access(out.parent, os.W_OK)


def _commit_by_exchange(staging: Path, out: Path, manifest_name: str) -> None:
    if not out.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it 0700
        fsync_dir(staging)
        fault_point("train:before-commit")
        os.rename(staging, out)
        fsync_dir(out.parent)
        fault_point("train:after-commit")
        return
    new_names = [p.name for p in staging.iterdir()]
    try:
        _link_tree(out, staging)
        os.chmod(staging, out.stat().st_mode & 0o7777)  # the folder keeps its mode
        fsync_dir(staging)
        fault_point("train:before-commit")
        _exchange(staging, out)
    except OSError as exc:
        if exc.errno not in _NO_EXCHANGE:
            raise
        # Hard links or the exchange refused (another user's files, an unusual filesystem):
        # commit through the journal inside ``out`` instead.
        inner = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING_TAG}{os.getpid()}-", dir=out))
        for name in new_names:
            os.replace(staging / name, inner / name)
        try:
            _commit_in_place(inner, out, manifest_name)
        finally:
            shutil.rmtree(inner, ignore_errors=True)
        return
    fsync_dir(out.parent)
    fault_point("train:after-commit")


def _commit_in_place(staging: Path, out: Path, manifest_name: str) -> None:
    journal = out / JOURNAL
    with _commit_lock(out):
        os.replace(staging, journal)  # the commit point
        fsync_dir(out)
        fault_point("train:journaled")
        names = sorted(p.name for p in journal.iterdir() if p.name != manifest_name) + [manifest_name]
        for name in names:
            os.replace(journal / name, out / name)
            fault_point("train:renamed-one")
        fsync_dir(out)
        os.rmdir(journal)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` that ``dst`` does not already have (folders recreated, links copied)."""
    for entry in os.scandir(src):
        target = dst / entry.name
        if target.exists() or target.is_symlink() or entry.name == JOURNAL:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            target.mkdir()
            shutil.copystat(entry.path, target)
            _link_tree(Path(entry.path), target)
        elif entry.is_file():
            os.link(entry.path, target)
        else:
            raise OSError(errno.EINVAL, f"cannot carry over {entry.path} (not a file or folder)")


def _remove_stale_staging(out: Path) -> None:
    """Remove staging folders left by killed trains (their process id is gone)."""
    for folder in (out.parent, out):
        if not folder.is_dir():
            continue
        prefix = f".{out.name}{_STAGING_TAG}"
        for p in folder.glob(f"{prefix}*"):
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> None:
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2()(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)




def _write_error(out: Path, exc: OSError) -> ArtifactWriteError:
    cause = exc.strerror or str(exc)
    return ArtifactWriteError(f"cannot write the artifacts to {out}: {cause}; the previous artifacts are unchanged")
