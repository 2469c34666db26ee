"""Where a study's shared state lives: a local/NFS path or an object-store URI (s3://, gs://, ... through pyarrow's
filesystems, the same layer Ray Train persists checkpoints with).

Only this module knows the difference. A URI keeps its query (`s3://bucket/dir?endpoint_override=host:9000&scheme=http`)
when joined, files are written atomically (temporary name + move on a filesystem; a single PUT on an object store),
and workers read shared files through `local_copy`, which downloads an object once per node.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(base: str | Path, *parts: str) -> str:
    """base/parts, keeping a URI's query string at the end."""
    text = str(base)
    head, sep, query = text.partition("?") if is_uri(text) else (text, "", "")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def _fs(location: str):
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: str) -> bool:
    import pyarrow.fs

    fs, path = _fs(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_text(location: str) -> str:
    if not is_uri(location):
        return Path(location).read_text()
    fs, path = _fs(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: str, text: str) -> None:
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: a kill never leaves half a file
        return
    fs, path = _fs(location)
    with fs.open_output_stream(path) as stream:  # one PUT: readers see the old object or the new one
        stream.write(text.encode())


def upload(local_file: Path, location: str) -> None:
    """Copy a local file to `location` unless something is already there (prepared files are content-addressed)."""
    import pyarrow.fs

    if exists(location):
        return
    fs, path = _fs(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(str(local_file), path, destination_filesystem=fs)


def local_copy(location: str, cache_dir: str | Path | None = None) -> Path:
    """A local path for a shared file or folder (a prepared shard folder): the path itself, or for a URI a node-local
    copy, downloaded once."""
    if not is_uri(location):
        return Path(location)
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "moelab-cache")
    target = cache / (hashlib.sha1(location.encode()).hexdigest()[:12] + "-" + location.split("?")[0].rsplit("/", 1)[-1])
    if not target.exists():
        import pyarrow.fs

        cache.mkdir(parents=True, exist_ok=True)
        fs, path = _fs(location)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
            for found in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)):
                if found.type == pyarrow.fs.FileType.File:
                    destination = partial / found.path[len(path):].lstrip("/")
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    pyarrow.fs.copy_files(found.path, str(destination), source_filesystem=fs)
        else:
            pyarrow.fs.copy_files(path, str(partial), source_filesystem=fs)
        try:
            os.replace(partial, target)  # concurrent workers on a node: the first rename wins, content is identical
        except OSError:  # a folder cannot replace the one another worker renamed into place first
            if not target.exists():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    return target


def subdirectories(location: str, prefix: str) -> list[str]:
    """Names of the directories directly under `location` that start with `prefix`, sorted."""
    import pyarrow.fs

    fs, path = _fs(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix))


def delete_dir(location: str) -> None:
    fs, path = _fs(location)
    fs.delete_dir(path)
