"""The artifact format: a folder with ``manifest.json`` and the files it lists with their sha256.

Everything in the manifest but its ``measured`` section is a pure function of the inputs, so compiling
the same model twice gives byte-identical model files and the same manifest apart from the timings.
Writing is atomic: files go to a temporary sibling folder that is renamed into place at the end, so a
failed compile leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qcompile.errors import ArtifactError
from qcompile.runtime.manifest import Manifest

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    """The file's sha256, read through one buffer. (Reading a new 1 MB block each time made glibc's malloc raise
    its mmap threshold, so the large allocations after it, onnxruntime's weights among them, stayed in the
    heap: 57 MB more resident once SmolLM2's W8A8 session had loaded after a verify.)"""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with path.open("rb") as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def dumps(manifest: Manifest) -> str:
    return json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"


@contextlib.contextmanager
def atomic_folder(destination: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``destination``; on success, it becomes ``destination``."""
    destination = destination.resolve()
    if destination.exists() and not (destination.is_dir() and (overwrite or not any(destination.iterdir()))):
        raise ArtifactError(f"output path {destination} exists and is not an empty folder; remove it or pass --force")
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=parent))
    except OSError as error:
        raise ArtifactError(f"cannot write to {parent}: {error.strerror}; choose a writable output path") from error
    try:
        yield staging
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an artifact (no {MANIFEST}); pass the folder qcompile wrote")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: unreadable manifest ({error})") from error
    return Manifest.from_json(data, str(path))


def verify(folder: Path) -> Manifest:
    """Check every file's sha256 against the manifest; return the manifest. Loads nothing."""
    manifest = read_manifest(folder)
    files = manifest.files
    if not files:
        raise ArtifactError(f"{folder}: the manifest lists no files")
    for name, expected in sorted(files.items()):
        path = (folder / name).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise ArtifactError(f"{folder}: manifest entry '{name}' points outside the artifact")
        if not path.is_file():
            raise ArtifactError(f"{folder}: file '{name}' listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{folder}: file '{name}' has sha256 {actual[:16]}..., the manifest says "
                f"{str(expected)[:16]}...; the artifact was modified or corrupted, recompile it"
            )
    return manifest
