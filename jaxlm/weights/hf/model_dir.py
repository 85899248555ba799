"""The files of a Hugging Face model directory, confined to it.

Every file the import reads from a model directory (config.json, the safetensors index and
shards, the tokenizer and its side files) and every tokenizer side file the export copies is
looked up through `confined`: a name that leaves the directory (`../x`, an absolute path) or a
symlink that resolves outside it is refused, so a crafted directory cannot make jaxlm read, and
copy into a model meant for sharing, a file from elsewhere on the machine.

The directory's bounds are its repository: the directory itself, or for a snapshot of the
Hugging Face cache (`<cache>/models--org--name/snapshots/<revision>/`, whose files are
symlinks to `../../blobs/<hash>`) the cache repository `models--org--name/`.
"""

from __future__ import annotations

import os

from jaxlm.run.errors import DataError

SNAPSHOTS = "snapshots"
BLOBS = "blobs"


def repository(model_dir: str) -> str:
    """The real path inside which the files of `model_dir` must resolve: the Hugging Face cache
    repository of a cache snapshot, else the directory itself."""
    real = os.path.realpath(model_dir)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == SNAPSHOTS and os.path.isdir(os.path.join(repo, BLOBS)):
        return repo
    return real


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


def confined(model_dir: str, name: str, what: str = "") -> str | None:
    """The path of the file `name` of `model_dir`, or None when there is no such file;
    a DataError when the name or a symlink on its way leads outside the directory's
    repository. `what` names the file that named `name` (e.g. the safetensors index)."""
    source = what or model_dir
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise DataError(f"{source}: names {name!r}, which is outside {model_dir}; refusing to "
                        "read it", path=source)
    path = os.path.join(model_dir, name)
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    if not _inside(real, repository(model_dir)):
        raise DataError(f"{path} leads to {real}, outside the model directory {model_dir}; "
                        "refusing to read it (copy the file into the directory if it belongs "
                        "to the model)", path=path)
    return path if os.path.isfile(real) else None
