"""Small helpers every stage's task adapter shares."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cluster.errors import UserError
from tasks.store import Store


def cache_root(cache_dir: str | None) -> Path:
    """The local cache for raw and downloaded data.

    An explicit ``cache_dir`` wins, then ``TRAINFLOW_CACHE_DIR``, then
    ``~/.cache/trainflow``. Read at call time, never at import.
    """
    chosen = cache_dir or os.environ.get("TRAINFLOW_CACHE_DIR") or "~/.cache/trainflow"
    return Path(chosen).expanduser()


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry IO hiccups, never inputs that cannot succeed."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


def result_storage(store: Store) -> Path:
    """Where Prefect persists cached task results.

    Inside a local store, so caches follow the data. For a remote store, in the
    local cache, keyed by the store's URI: Prefect's remote result storage needs
    a server-side block, which a run from the CLI with no server does not have.
    """
    if store.is_local:
        return Path(store.ray_storage_path("prefect-results"))
    digest = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
    return cache_root(None) / "prefect-results" / digest
