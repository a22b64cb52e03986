"""The model registry in the store: layout, reads, and champion moves.

Layout::

    models/<name>/versions/<n>/{model files, state.json, metrics.json, lineage.json, card.md, confusion.png}
    models/<name>/versions/<n>/manifest.json   # written last: every file, size, sha256
    models/<name>/versions/<n>/promotions/<time>.json   # one immutable record per promotion
    models/<name>/champion.json                # replaced only by compare-and-swap

A version number is claimed create-only before anything is written, so two
publishers never share one; a version without its manifest does not exist for
readers; the champion pointer moves only to a version whose manifest is in
place, and only if it still points where the mover read it (S3: If-Match /
If-None-Match; folders: a lock file around compare-and-replace).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from cluster.errors import UserError
from tasks.store import AlreadyExists, Store

MANIFEST = "manifest.json"
CHAMPION = "champion.json"


def versions_prefix(name: str) -> str:
    return f"models/{name}/versions"


def published_versions(store: Store, name: str) -> list[int]:
    """Versions that have a manifest, ascending."""
    prefix = versions_prefix(name)
    return sorted(int(k.split("/")[-2]) for k in store.list(prefix) if k.endswith(f"/{MANIFEST}"))


def claim_version(store: Store, name: str) -> int:
    """Reserve the next free version number (create-only marker) and return it."""
    prefix = versions_prefix(name)
    taken = {int(k[len(prefix) + 1:].split("/")[0]) for k in store.list(prefix)}
    n = max(taken, default=0) + 1
    while True:
        try:
            store.put_bytes(f"{prefix}/{n}/.claim", b"", if_absent=True)
            return n
        except AlreadyExists:
            n += 1


def read_champion(store: Store, name: str) -> tuple[bytes | None, dict | None]:
    """The champion pointer's raw bytes (for compare-and-swap) and its content."""
    key = f"models/{name}/{CHAMPION}"
    if not store.exists(key):
        return None, None
    raw = store.get_bytes(key)
    return raw, json.loads(raw)


def model_names(store: Store) -> list[str]:
    """Every model name that has at least one published version."""
    return sorted({k.split("/")[1] for k in store.list("models") if k.endswith(f"/{MANIFEST}")})


def read_version(store: Store, name: str, version: int) -> dict:
    """A published version's manifest, metrics, lineage and promotion records.

    Raises:
        UserError: when the version is not published (no manifest).
    """
    prefix = f"{versions_prefix(name)}/{version}"
    if not store.exists(f"{prefix}/{MANIFEST}"):
        published = published_versions(store, name)
        raise UserError(f"model {name!r} has no published version {version} in {store.uri}; "
                        f"published: {published or 'none'}.")
    load = lambda file: json.loads(store.get_bytes(f"{prefix}/{file}"))  # noqa: E731
    promotions = [json.loads(store.get_bytes(k)) for k in store.list(f"{prefix}/promotions")]
    return {"name": name, "version": version, "uri": store.child_uri(prefix), "manifest": load(MANIFEST),
            "metrics": load("metrics.json"), "lineage": load("lineage.json"), "promotions": promotions}


def move_champion(store: Store, name: str, version: int, accuracy: float, by: str, reason: str,
                  expected: bytes | None) -> bool:
    """Point the champion at ``version`` if it still holds ``expected``; record the promotion."""
    now = datetime.now(timezone.utc).isoformat()
    pointer = {"version": version, "test_accuracy": accuracy, "promoted_at": now, "promoted_by": by}
    if not store.swap(f"models/{name}/{CHAMPION}", json.dumps(pointer, indent=2).encode(), expected=expected):
        return False
    record = {**pointer, "reason": reason, "previous": json.loads(expected) if expected else None}
    store.put_bytes(f"{versions_prefix(name)}/{version}/promotions/{now.replace(':', '-')}.json",
                    json.dumps(record, indent=2).encode())
    return True


def promote(store: Store, name: str, version: int, reason: str = "promoted by hand") -> dict:
    """Make a published version the champion regardless of the gate (``trainflow models promote``)."""
    info = read_version(store, name, version)
    while True:
        raw, _ = read_champion(store, name)
        if move_champion(store, name, version, info["metrics"]["accuracy"], "manual", reason, raw):
            return read_champion(store, name)[1]
