"""``trainflow up`` / ``trainflow down``: the local services a developer keeps running between runs.

``up`` starts a Prefect server (API and UI on 127.0.0.1:4200) and a one-node
Ray head on loopback, each a foreground process in a session of its own, and
writes what it started to ``$TRAINFLOW_HOME/services.json`` (default
``~/.trainflow``): the processes (PID and start time, so a reused PID is
never mistaken for ours), the addresses, and the path of the Ray head's token,
a file only its owner can read. While that file names live processes,
``trainflow run`` uses both, so its runs land in the server whose UI is open and
skip starting Ray and a temporary Prefect server, and every run given no Ray
address (those that ``trainflow serve`` or a Prefect worker start too) trains
on the head instead of starting a Ray of its own. ``down`` stops those
processes and their descendants, and nothing else: another Ray or Prefect on
the machine is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.errors import UserError
from cluster.ports import free_port

PREFECT_HOST = "127.0.0.1"
RAY_HOST = "127.0.0.2"  # `ray start` on 127.0.0.1 advertises the machine's outward address instead
STATE_FILE = "services.json"


def home() -> Path:
    return Path(os.environ.get("TRAINFLOW_HOME") or Path.home() / ".trainflow")


@dataclass(frozen=True)
class Process:
    """A process we started, as (PID, start time): a later process with a reused PID is not it."""

    pid: int
    started: float

    @classmethod
    def of(cls, pid: int) -> Process:
        import psutil

        return cls(pid, psutil.Process(pid).create_time())

    def alive(self) -> bool:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


@dataclass(frozen=True)
class Services:
    prefect_url: str  # the API; the UI is at the same host and port
    ray_address: str  # the head's GCS, host:port
    token_file: str  # the Ray head's authentication token
    ray_temp_dir: str
    prefect: Process
    ray: Process

    @property
    def ui_url(self) -> str:
        return self.prefect_url.removesuffix("/api")

    def alive(self) -> bool:
        return self.prefect.alive() and self.ray.alive()

    def describe(self) -> str:
        return f"Prefect server {self.ui_url} (UI), Ray head {self.ray_address}"


def running() -> Services | None:
    """The services ``trainflow up`` started, while both still run; else None."""
    path = home() / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        found = Services(**{**raw, "prefect": Process(**raw["prefect"]), "ray": Process(**raw["ray"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return found if found.alive() else None


def use_prefect(services: Services) -> None:
    """Point this process's Prefect client at ``services``' server, unless the user chose one; before Prefect
    is imported (it reads its settings once)."""
    os.environ.setdefault("PREFECT_API_URL", services.prefect_url)


def use_ray_head() -> None:
    """When ``up``'s services run, let this process's "start Ray locally" join their Ray head instead
    (:func:`cluster.execution.session.use_local_head`)."""
    found = running()
    if found is not None:
        from cluster.execution import session

        session.use_local_head(found.ray_address, found.token_file)


def up(*, prefect_port: int = 4200, ray_cpus: int | None = None, timeout: float = 90) -> Services:
    """Start both services (or return the ones already up) and record them."""
    already = running()
    if already is not None:
        return already
    down()  # what is left of an earlier `up` whose other half died
    _check_port_free(PREFECT_HOST, prefect_port, "--prefect-port")
    state_dir = home()
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    token_file = state_dir / "ray_token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(secrets.token_hex(32))
    ray_port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="trainflow-up-"))  # short: Ray's socket paths must fit 107 bytes
    started: list[subprocess.Popen] = []
    try:
        started.append(prefect := _start_prefect(prefect_port, logs / "prefect.log"))
        started.append(ray := _start_ray(ray_port, ray_cpus, temp_dir, token_file, logs / "ray.log"))
        services = Services(prefect_url=f"http://{PREFECT_HOST}:{prefect_port}/api",
                            ray_address=f"{RAY_HOST}:{ray_port}", token_file=str(token_file),
                            ray_temp_dir=str(temp_dir), prefect=Process.of(prefect.pid), ray=Process.of(ray.pid))
        _wait_until(lambda: _prefect_healthy(services.prefect_url), prefect, timeout, logs / "prefect.log")
        _wait_until(lambda: "Ray runtime started" in _tail(logs / "ray.log"), ray, timeout, logs / "ray.log")
    except BaseException:
        _stop_trees([p.pid for p in started])
        raise
    (state_dir / STATE_FILE).write_text(json.dumps(asdict(services), indent=2))
    return services


def down() -> list[str]:
    """Stop what ``up`` started (both process trees); returns what was stopped."""
    path = home() / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    stopped = []
    for name in ("prefect", "ray"):
        process = Process(**raw[name])
        if process.alive():
            _stop_trees([process.pid])
            stopped.append(f"{name} (pid {process.pid})")
    path.unlink(missing_ok=True)
    if raw.get("ray_temp_dir"):
        shutil.rmtree(raw["ray_temp_dir"], ignore_errors=True)
    return stopped


def _start_prefect(port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", PREFECT_HOST,
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _start_ray(port: int, cpus: int | None, temp_dir: Path, token_file: Path, log: Path) -> subprocess.Popen:
    drop = {"RAY_ADDRESS", "RAY_TMPDIR", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_TMPDIR": str(temp_dir),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # `down` stops it at once
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", "--head", "--block", f"--node-ip-address={RAY_HOST}", f"--port={port}",
               f"--num-cpus={cpus or os.cpu_count()}", "--include-dashboard=false", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir / 'ray'}"]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=temp_dir, env=env, start_new_session=True)


def _prefect_healthy(api_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_until(ready, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"exited ({process.returncode})" if process.poll() is not None else f"not ready in {timeout:g} s"
            raise UserError(f"trainflow up: {' '.join(map(str, process.args[:4]))} {why}; see {log}: "
                            f"{' '.join(_tail(log, 300).split())}")
        time.sleep(0.2)


def _tail(path: Path, chars: int = 20_000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop_trees(pids: list[int], grace: float = 15) -> None:
    """SIGTERM each process and its descendants, then SIGKILL what is left after ``grace`` seconds."""
    import psutil

    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _check_port_free(host: str, port: int, option: str) -> None:
    with socket.socket() as s:
        # as the server will bind it: connections of a server just stopped (TIME_WAIT) do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"{host}:{port} is already in use (another Prefect server?); stop what uses it, "
                            f"or choose another port with {option}.") from None
