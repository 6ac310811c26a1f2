"""Folders the pytest-xdist workers build once and share: the first worker to need one builds it
while the others wait on its lock, then they all read it."""
import contextlib
import os

from filelock import FileLock

WORKER = os.environ.get("PYTEST_XDIST_WORKER")


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """A folder ``name`` shared by the workers (and ``True`` if a worker already finished building
    it); while inside, the other workers wait. Mark it built with ``mark_built``."""
    root = tmp_path_factory.getbasetemp()
    if WORKER:
        root = root.parent  # pytest-N/, the workers' own folders are pytest-N/popen-gwK/
    path = root / name
    with FileLock(str(path) + ".lock"):
        path.mkdir(exist_ok=True)
        yield path, (path / ".built").exists()


def mark_built(path) -> None:
    (path / ".built").touch()
