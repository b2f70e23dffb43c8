"""What every part of the package shares: the error types that end a command with a one-line message, and
durable file writes (a file appears whole or not at all, and a kept copy is never overwritten)."""
import os
import shutil
import tempfile
from pathlib import Path


class ConfigError(Exception):
    """An option or config file is wrong; the message says which and how to fix it."""


class DataError(Exception):
    """A data set is missing or cannot be built; the message says how to fix it."""


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


class NonFiniteLossError(Exception):
    """Training produced a nan/inf loss; the run stops before it can save bad weights."""


# Under torchrun every process raises these together (from values all of them share, or through
# device.collectively): the job can leave its process group in order. Any other error is one process's own.
EVERY_PROCESS_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, fsync it, then rename it over path.

    A crash or an exception inside write() leaves path as it was (or absent) and no temporary
    file behind; after the rename the folder is fsynced so the new name survives a power cut."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def keep_as(path, keep_path):
    """Make keep_path hold what path holds now, atomically and without a copy where the file
    system allows (a hard link): a later atomic_write to path leaves keep_path unchanged."""
    keep_path = Path(keep_path)
    tmp = keep_path.with_name(f".{keep_path.name}.{os.getpid()}.tmp")
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, keep_path)
