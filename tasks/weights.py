"""Starting weights (``--weights``): resolved on the driver, staged in the store once, verified by sha256.

A reference is one of:

* a local file (a state dict as ``*.pt``, ``*.pth`` or ``*.safetensors`` for torch; ``*.keras`` for TensorFlow);
* ``s3://bucket/key`` of such a file (credentials from the AWS environment, as the store's);
* ``model:NAME[@VERSION]``: a published version of the run's registry (default: the champion);
* ``torchvision:WEIGHTS``: torchvision's named weights of the run's ``torchvision:<name>`` model (such as
  ``IMAGENET1K_V1``), from torch's cache (``$TORCH_HOME/hub/checkpoints``), downloaded into it when missing.

A file from outside the store is copied into it once, at ``weights/<sha256>/<file name>``: every node of a
cluster then fetches the same bytes through the store (once per node, checked against the hash), whatever
the driver's disk holds. The hash joins the run's identity and its lineage.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cluster.errors import UserError
from tasks.registry import read_champion, read_version, versions_prefix
from tasks.store import Store, open_store

__all__ = ["SUFFIXES", "StagedWeights", "resolve_weights"]

# the files each framework's loop loads safely: torch.load(weights_only=True); Keras load_model(safe_mode=True)
SUFFIXES = {"torch": (".pt", ".pth", ".safetensors"), "tensorflow": (".keras",)}


@dataclass(frozen=True)
class StagedWeights:
    """Starting weights as the workers find them: a key of the run's store and the bytes' sha256."""

    origin: str  # the reference as given, a registry reference with the version it resolved to
    key: str
    sha256: str

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.key).name


def resolve_weights(reference: str, store: Store, framework: str, model: str = "") -> StagedWeights:
    """Find ``reference``'s bytes, check that ``framework`` can load them into ``model`` (the run's network, for
    torchvision's named weights), and stage them in ``store``.

    Raises:
        UserError: for a file, URI or registry version that is not there, or a format the framework cannot load.
    """
    if reference.startswith("model:"):
        return _published(reference, store, framework)
    if reference.startswith("torchvision:"):
        return _once((reference, model, store.uri), store, lambda: _torchvision_cache(reference, model), reference)
    if reference.startswith("s3://"):
        bucket_and_key = reference[len("s3://"):]
        folder, _, name = bucket_and_key.rpartition("/")
        if not folder or not name:
            raise UserError(f"weights={reference!r} names no object; give s3://bucket/path/to/file.")
        _check_suffix(reference, name, framework)
        try:
            data = open_store(f"s3://{folder}").get_bytes(name)
        except FileNotFoundError:
            raise UserError(f"weights={reference!r} does not exist; check the bucket and key.") from None
    else:
        path = Path(reference).expanduser()
        if not path.is_file():
            raise UserError(f"weights={reference!r} is not a file on this machine; give a file, an s3:// URI or "
                            "model:NAME[@VERSION].")
        _check_suffix(reference, path.name, framework)
        stat = path.stat()
        return _once((str(path.resolve()), stat.st_size, stat.st_mtime_ns, store.uri), store, lambda: path,
                     reference)
    return _stage(reference, name, data, store)


# What this process has staged already: a run resolves its weights in the CLI's checks, the flow's and the train
# task; a local file (by path, size and time) or torchvision's named weights are read and hashed once.
_resolved: dict[tuple, StagedWeights] = {}


def _once(seen: tuple, store: Store, find: Callable[[], Path], reference: str) -> StagedWeights:
    """The weights staged for ``seen`` in this process, unless the store has lost them; else ``find``'s file, staged."""
    if (found := _resolved.get(seen)) is None or not store.exists(found.key):
        path = find()
        found = _resolved[seen] = _stage(reference, path.name, path.read_bytes(), store)
    return found


def _stage(reference: str, name: str, data: bytes, store: Store) -> StagedWeights:
    digest = hashlib.sha256(data).hexdigest()
    key = f"weights/{digest}/{name}"
    if not store.exists(key):  # content-addressed: the same bytes are staged once
        store.put_bytes(key, data)
    return StagedWeights(origin=reference, key=key, sha256=digest)


# Run in a process of its own: this one (Prefect's) must not load torch. Prints the weights' file in torch's
# cache, downloading it there first when missing (torchvision checks the download's hash).
_TORCHVISION_WEIGHTS = """
import os, sys, torch, torchvision
weights = torchvision.models.get_model_weights(sys.argv[1])[sys.argv[2]]
path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
if not os.path.isfile(path):
    weights.get_state_dict(progress=False, check_hash=True)
print(path)
"""


def _torchvision_cache(reference: str, model: str) -> Path:
    """The file of torchvision's weights ``reference`` names for ``model``, in torch's cache."""
    arch, names = model.partition(":")[2], reference.partition(":")[2]
    if not model.startswith("torchvision:"):
        raise UserError(f"weights={reference!r} are torchvision's, for a torchvision network; set model to "
                        "torchvision:<name>, or give a file, an s3:// URI or model:NAME[@VERSION].")
    found = subprocess.run([sys.executable, "-c", _TORCHVISION_WEIGHTS, arch, names], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise UserError(f"weights={reference!r} of {model}: torchvision could not provide them ({last}); use one "
                        f"of torchvision.models.get_model_weights({arch!r}) (such as IMAGENET1K_V1), and where there "
                        "is no network put its file in torch's cache ($TORCH_HOME/hub/checkpoints) first.")
    return Path(found.stdout.strip().splitlines()[-1])


def _check_suffix(reference: str, name: str, framework: str) -> None:
    if not name.endswith(SUFFIXES[framework]):
        raise UserError(f"weights={reference!r}: framework={framework!r} loads {', '.join(SUFFIXES[framework])} "
                        "files; give one of those.")


def _published(reference: str, store: Store, framework: str) -> StagedWeights:
    """A version of the registry: its model file, with the sha256 its manifest recorded at publishing."""
    name, _, version = reference[len("model:"):].partition("@")
    if not name:
        raise UserError(f"weights={reference!r} names no model; give model:NAME or model:NAME@VERSION.")
    if version:
        if not version.isdigit():
            raise UserError(f"weights={reference!r}: the version must be a number, as model:{name}@3.")
        number = int(version)
    else:
        _, champion = read_champion(store, name)
        if champion is None:
            raise UserError(f"weights={reference!r}: model {name!r} has no champion in {store.uri}; name a "
                            f"version (model:{name}@N) or publish one first.")
        number = int(champion["version"])
    published = read_version(store, name, number)
    prefix = f"{versions_prefix(name)}/{number}"
    state = json.loads(store.get_bytes(f"{prefix}/state.json"))
    if state.get("framework", "torch") != framework:
        raise UserError(f"weights={reference!r}: version {number} was trained with {state.get('framework')}, "
                        f"this run trains with {framework}; choose a version of the same framework.")
    model_file = state.get("model_files", ["model.pt"])[0]
    digests = {f["name"]: f["sha256"] for f in published["manifest"]["files"]}
    return StagedWeights(origin=f"model:{name}@{number}", key=f"{prefix}/{model_file}", sha256=digests[model_file])
