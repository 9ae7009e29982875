"""Crash-safe output files (a file nanollava writes is either complete or untouched), and the one
JSON reader for the files it reads back.

  atomic_write(path)   write PATH.tmp, flush, fsync, rename it over PATH, fsync the directory.
                       On any error (a full disk, a kill between the steps) PATH keeps its old
                       content and no PATH.tmp is left behind.
  replacing(path)      the same for writers that want a file name (safetensors' save_file).
  append_line(path)    one line, fsynced; a failed append is cut back off, so the file never
                       ends in a torn line of ours (readers still drop one a kill -9 leaves).
  locked(directory)    an exclusive flock on DIR/<name>.lock for the whole run, so a second run
                       with the same output directory stops with a clear error.
  read_json(path)      a JSON file read back; missing or malformed is one line naming it.

Errors while writing are a WriteError (an OSError) that names the file.
"""
import fcntl
import json
import os
import socket
from contextlib import contextmanager


class WriteError(OSError):
    """An output file could not be written (disk full, permissions ...); the old one is intact."""


class Busy(RuntimeError):
    """The output directory is locked by another run."""


def _fsync_dir(directory):
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path):
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over
    `path`. On failure the temporary file is removed and `path` is left as it was."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"cannot write {path}: {e.strerror or e}; "
                             f"the previous {os.path.basename(path)} (if any) is unchanged") from None
        raise
    _fsync_dir(os.path.dirname(path))


@contextmanager
def atomic_write(path, mode="w"):
    """`with atomic_write(path) as f: f.write(...)`: all of it lands in `path`, or none of it."""
    with replacing(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def append_line(path, line):
    """Append `line` + newline and fsync; on a write error the partial line is truncated away."""
    path = os.fspath(path)
    with open(path, "a", encoding="utf-8") as f:
        size = f.tell()
        try:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            os.truncate(path, size)
            raise WriteError(f"cannot append to {path}: {e.strerror or e}") from None


@contextmanager
def locked(directory, name="train.lock"):
    """Hold an exclusive lock on `directory` (creating it) until the block ends. The lock file
    stays (removing it would race with the next run); it names the holder for the error."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    f = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(f"{directory} is in use by another run ({holder} holds {path}); "
                       "wait for it to finish or pick another output directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield path
    finally:
        f.close()                                        # closing releases the flock


def read_json(path, what="file"):
    """A JSON file nanollava reads (a config, an index, a meta.json, a benchmark's file); a missing
    or malformed one is one line naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{what} {path}: not valid JSON ({e})") from None
