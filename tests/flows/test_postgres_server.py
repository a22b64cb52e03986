"""A Prefect server backed by PostgreSQL (Debian's, started here on 127.0.0.1) runs the pipeline."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cluster.ports import free_port
from tests.flows.test_cli import trainflow
from tests.prefectserver import api as call, start_prefect_server, stop


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def as_postgres(*cmd: str) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth), stopped and deleted afterwards."""
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries are missing: `make test` installs Debian's postgresql package")
    # not under pytest's root-only temp dir: the postgres user must be able to reach it
    root = Path(tempfile.mkdtemp(prefix="trainflow-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    subprocess.run(as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                               "--no-sync"), check=True, capture_output=True)
    subprocess.run(as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                               "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"), check=True, capture_output=True)
    try:
        subprocess.run(as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                   "prefect"), check=True, capture_output=True)
        yield port
    finally:
        subprocess.run(as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_pipeline_runs_on_a_postgres_backed_server(postgres, tmp_path):
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{postgres}/prefect"
    home = tmp_path / "home"
    home.mkdir()
    api, server = start_prefect_server(home, PREFECT_API_DATABASE_CONNECTION_URL=url)
    try:
        out = trainflow("run", "--preset", "smoke", "--store", str(tmp_path / "store"), "--json",
                        env={"PREFECT_API_URL": api})
        assert out.returncode == 0, out.stderr[-3000:]
        runs = call("POST", f"{api}/flow_runs/filter", json={}).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
    finally:
        stop(server)
    rows = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(postgres), "-U", "postgres", "-d", "prefect",
                           "-tAc", "select count(*) from flow_run where state_type = 'COMPLETED'"],
                          capture_output=True, text=True, check=True)
    assert rows.stdout.strip() == "1"  # the run lives in PostgreSQL, not in a SQLite file
