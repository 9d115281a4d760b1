"""Reading ``.pth`` files without ever running code from them.

A ``.pth`` file is a pickle, and unpickling can call any function the file names (``os.system``
included). Weights come from the internet (the official checkpoints), from colleagues and from shared
folders, so every file is read with torch's weights-only unpickler: tensors, containers, numbers and
strings, plus the few types our checkpoints and the official MMDetection ones really hold, allowed here
by name. Any other type stops the load with an error naming the file and the type; nothing of it runs.

Allowed beyond torch's own list:
- numpy arrays, dtypes and scalars (the numpy RNG state in our checkpoints; metadata of mmdet files),
  under numpy 1.x and 2.x module names;
- MMEngine's ``HistoryBuffer`` (the log of an MMDetection 3.x checkpoint's ``message_hub``) and
  ``torch.torch_version.TorchVersion``, read as inert stand-ins: their data is kept, none of their code
  is imported or run.
"""
import contextlib
import errno
import fcntl
import os
import pickletools
import re
import shutil
import socket
import sys
import time
import urllib.parse
import zipfile

import numpy as np
import torch

from ..config import ConfigError


class FileError(ValueError):
    """A file that cannot be used; the message names it and says why."""


class UnsafeFileError(FileError):
    """The file holds a type a weights file never needs; loading it could run code."""


def report_file_errors(main):
    """Run a script's ``main``; a FileError or a config mistake (ConfigError: a missing config file, an
    unknown key) ends it with that one line instead of a traceback."""
    try:
        main()
    except (FileError, ConfigError) as e:
        sys.exit(f"error: {e}")


def _stand_in(module, name):
    """A plain class registered under ``module.name``: unpickling it stores its state, nothing else."""

    class StandIn:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

        def __setstate__(self, state):
            self.state = state

    StandIn.__module__, StandIn.__name__, StandIn.__qualname__ = module, name, name
    return StandIn


def _alias(function, module, name):
    """``function`` under another pickled name (numpy 1.x wrote ``numpy.core``, 2.x ``numpy._core``)."""

    def aliased(*args):
        return function(*args)

    aliased.__module__, aliased.__name__, aliased.__qualname__ = module, name, name
    return aliased


def _allowed():
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [np.ndarray, np.dtype, type(np.dtype("float64")), type(np.dtype("int64")), type(np.dtype("uint32"))]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [_alias(multiarray._reconstruct, module, "_reconstruct"),
                    _alias(multiarray.scalar, module, "scalar")]
    allowed += [_stand_in("mmengine.logging.history_buffer", "HistoryBuffer"),
                _stand_in("torch.torch_version", "TorchVersion")]
    return allowed


ALLOWED = _allowed()
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)|Unsupported operand (\d+)")


def load_file(path_or_url, mmap=False):
    """The object stored in a ``.pth`` file or at a URL (downloaded once into torch.hub's cache), on the
    CPU. Raises UnsafeFileError for a file that would run code, FileError for one that cannot be read;
    both name the file."""
    path = _download(path_or_url) if "://" in str(path_or_url) else str(path_or_url)
    if not os.path.isfile(path):
        raise FileError(f"{path}: no such file")
    mmap = mmap and zipfile.is_zipfile(path)  # files of the pre-1.6 format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one line naming the file
        raise _explain(path, e) from None


def _explain(path, error):
    message = str(error)
    if "Weights only load failed" in message:
        return UnsafeFileError(f"{path}: refused to load: it holds {_unsafe_content(path, message)}, which weights "
                               "never need (unpickling it could run code)")
    first_line = message.splitlines()[0][:200] if message else ""
    if "central directory" in message or "failed reading zip archive" in message:
        return FileError(f"{path} cannot be read: truncated or not a PyTorch file ({first_line})")
    return FileError(f"{path} cannot be read: damaged or not a PyTorch file ({type(error).__name__}: {first_line})")


def _unsafe_content(path, message):
    """What the weights-only reader refused: the types a zip checkpoint names, else the reader's words."""
    if zipfile.is_zipfile(path):
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in ALLOWED}
        try:
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
        except Exception:  # noqa: BLE001 - fall back to the reader's message
            names = []
        if names:
            return ", ".join(names)
    else:
        names = _legacy_globals(path)
        if names:
            return ", ".join(names)
    found = _UNSUPPORTED.search(message)
    if found and found.group(1):
        return found.group(1)
    if found:
        return f"pickle instruction {found.group(2)}, which torch's weights-only reader does not run"
    return "content torch's weights-only reader does not accept"


def _legacy_globals(path, max_pickles=5):
    """The module.name globals of a plain pickle or a pre-1.6 torch file (a few pickles in a row), read
    with pickletools, which only parses; the ones not allowed here."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in ALLOWED}
    found = []
    try:
        with open(path, "rb") as f:
            for _ in range(max_pickles):
                strings = []
                for opcode, arg, _ in pickletools.genops(f):
                    if isinstance(arg, str):
                        strings.append(arg)
                    if opcode.name == "GLOBAL":
                        found.append(arg.replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - the end of the pickles, or not a pickle
        pass
    ours = ("torch.", "collections.")  # tensors and OrderedDicts: what torch's reader accepts anyway
    return [name for name in dict.fromkeys(found) if name not in allowed and not name.startswith(ours)]


def save_file(obj, path):
    """``torch.save`` through ``path.tmp``, synced, then renamed: ``path`` is the old file or the whole new
    one, never a part. A failed write (full disk, no permission) removes the temporary file and raises a
    FileError that says what and where; the file that was there stays untouched."""
    path = str(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
        reason = write_failure(e, path)  # before the removal frees the space again
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise FileError(f"cannot write {path}: {reason}; nothing was replaced") from None


def write_failure(error, path):
    """Why writing ``path`` failed, in words (a full disk is said so)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < (64 << 20)):
        return f"the disk is full ({free or 0:,} bytes free in {folder})" if free is not None else "the disk is full"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if "unexpected pos" in str(error):  # torch's zip writer, when a write returned short
        return "the write stopped short (a full disk, a quota or a file-size limit)"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held while the object lives: a second run into the
    same output folder stops at start instead of mixing its checkpoints and logs with the first's. The
    kernel releases the lock when the process ends, however it ends (kill -9 included), so it never
    outlives its run. On a file system without flock (some network mounts) it warns and does nothing."""

    def __init__(self, folder, log=print):
        self.path = os.path.join(folder, ".lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise FileError(f"{folder} is the output folder of a run that is still going ({owner}); "
                            "use another --output-dir, or stop that run first") from None
        except OSError as e:  # no flock support here
            log(f"WARNING: cannot lock {self.path} ({e.strerror}): nothing stops a second run into {folder}")
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()


def _download(url):
    """torch.hub's cache file for ``url`` (``<hub dir>/checkpoints/<file name>``), downloaded if absent."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=False)
    return path
