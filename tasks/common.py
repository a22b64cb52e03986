"""Small helpers every stage's task adapter shares."""

from __future__ import annotations

from pathlib import Path

from cluster.data import file_sha256
from cluster.errors import UserError
from cluster.execution.nodecache import node_cache_root

__all__ = ["cache_root", "file_sha256", "in_prefect_run", "result_storage", "retry_unless_user_error"]


def in_prefect_run() -> bool:
    """True inside a Prefect task or flow run; False when a task's ``.fn`` is called directly.

    Artifacts are made only in a run: a bare ``.fn`` call must not start a server to hold them.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def cache_root(cache_dir: str | None) -> Path:
    """The local cache for raw and downloaded data.

    An explicit ``cache_dir`` wins, then ``TRAINFLOW_CACHE_DIR``, then
    ``~/.cache/trainflow``. Read at call time, never at import.
    """
    return Path(cache_dir).expanduser() if cache_dir else node_cache_root()


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry IO hiccups, never inputs that cannot succeed."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


def result_storage(cache_dir: str | None) -> Path:
    """Where Prefect persists cached task results: the local cache, beside the raw data they describe.

    Only ingest is cached by Prefect (its result points into this cache). Stages
    whose output lives in the store find it there themselves, so a wiped or
    different store is never mistaken for a cache hit, and a failed run leaves
    nothing in the store.
    """
    return cache_root(cache_dir) / "prefect-results"
