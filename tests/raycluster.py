"""A real multi-node Ray cluster on this machine, for the tests: `ray start` processes we own, stopped by PID.

Every node is one foreground `ray start --block` process on 127.0.0.2 with its
own short temporary folder (unix socket paths must stay under 107 characters)
and free ports, so that another Ray on this machine is never touched. The
cluster uses token authentication; a driver needs only :attr:`RayTestCluster.env`.

A *hidden* node runs in its own mount namespace, with an empty tmpfs over this
checkout's packages and over any folder the caller names: it shares no files
with the driver except the virtual environment (its dependencies), as a
separate machine of a real cluster would.

Nothing in the pytest process imports Ray: readiness and node liveness are
asked of a short driver in a subprocess (:meth:`RayTestCluster.run_driver`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cluster.ports import free_port, free_ports
from tests.docs.runblocks import process_table

HEAD_IP = "127.0.0.2"
CHECKOUT = Path(__file__).resolve().parents[1]
PACKAGES = tuple(CHECKOUT / name for name in ("flows", "tasks", "cluster"))
MARKER = "TRAINFLOW_RAYTEST_ROOT"  # in every node process's environment: finds our processes, and only ours
# On SIGTERM a node waits up to 30 s for its leases to drain; a test cluster is stopped at once.
NODE_DEFAULTS = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
_READY = "Ray runtime started"
_Proc = tuple[int, int]  # (pid, start time in clock ticks): a PID cannot be mistaken for a reused one


@dataclass
class Node:
    """One `ray start --block` process and what it owns.

    Attributes:
        name: ``head`` or ``node-<n>``.
        process: The `ray start` process (for a hidden node, `unshare` that became it by exec).
        temp_dir: This node's own folder: RAY_TMPDIR, and ``ray-temp/`` inside it is its ``--temp-dir``
            (sessions, logs, sockets, runtime_env downloads).
        log_path: Where `ray start`'s own output goes.
        hidden: Whether the node runs with the cluster's hidden paths covered by empty folders.
        node_id: Ray's hex node id, read from the raylet's command line once it runs.
    """

    name: str
    process: subprocess.Popen[bytes]
    temp_dir: Path
    log_path: Path
    hidden: bool
    node_id: str = ""

    @property
    def running(self) -> bool:
        """Whether the `ray start` process is still running."""
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of `ray start`'s output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@dataclass
class RayTestCluster:
    """A running multi-node Ray cluster on 127.0.0.2 that this process started.

    Attributes:
        workdir: The caller's folder: `ray start` logs and driver scripts go here.
        root: Short temporary folder under /tmp holding every node's RAY_TMPDIR; removed by :meth:`stop`.
        gcs_address: ``127.0.0.2:<port>``, what a driver passes to ``ray.init(address=...)``.
        token: The cluster's authentication token.
        hidden_paths: Folders that hidden nodes see as empty.
        dashboard_url: ``http://127.0.0.2:<port>`` when the dashboard runs (needs ray[default]), else None.
        client_address: ``ray://127.0.0.2:<port>`` when the Ray Client server runs (needs ray[client]), else None.
        node_env: Extra environment for every node process.
        nodes: Every node started, the head first, killed ones included.
    """

    workdir: Path
    root: Path
    gcs_address: str
    token: str
    hidden_paths: tuple[Path, ...] = ()
    dashboard_url: str | None = None
    client_address: str | None = None
    node_env: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    _seen: set[_Proc] = field(default_factory=set, repr=False)

    @property
    def head_ip(self) -> str:
        """The address every node and port of this cluster is bound to."""
        return HEAD_IP

    @property
    def head(self) -> Node:
        """The head node."""
        return self.nodes[0]

    @property
    def env(self) -> dict[str, str]:
        """What a driver's environment needs to connect: token mode and the token.

        No RAY_TMPDIR: a driver attaches to the head's raylet, found through
        the GCS, and uses that node's session folder. No RAY_ADDRESS either:
        the caller says which address it connects to.
        """
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def add_node(self, num_cpus: int = 1, hidden: bool = True, resources: Mapping[str, float] | None = None,
                 timeout: float = 90) -> Node:
        """Start a worker node and wait until the cluster counts it alive.

        Args:
            num_cpus: CPUs the node offers.
            hidden: Run it with the hidden paths covered by empty folders (needs `unshare`).
            resources: Custom resources the node offers, e.g. ``{"node2": 1}``.
            timeout: Seconds to wait for it.

        Returns:
            The node, with its node id.

        Raises:
            RuntimeError: The node did not start in time (with the end of its log), or hiding is not possible here.
        """
        if hidden and (reason := hiding_unsupported()):
            raise RuntimeError(f"cannot start a hidden node: {reason}")
        name = f"node-{len(self.nodes)}"
        args = ["--address", self.gcs_address, *_node_args(num_cpus, resources)]
        node = _spawn(self, name, args, hidden)
        self.nodes.append(node)
        _wait_started(self, node, timeout)
        self.wait_for_nodes(len(self.alive_nodes()), timeout)
        return node

    def alive_nodes(self) -> list[Node]:
        """The nodes whose `ray start` process still runs."""
        return [node for node in self.nodes if node.running]

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process of ``node`` at once, as if its machine were lost.

        The processes are frozen first (SIGSTOP), so that none can spawn or
        restart another while the tree is being collected.
        """
        procs = self._tree([node.process.pid])
        while True:
            _signal_all(procs, signal.SIGSTOP)
            more = self._tree(pid for pid, _ in procs) - procs
            if not more:
                break
            procs |= more
        _signal_all(procs, signal.SIGKILL)
        node.process.wait(timeout=30)
        _wait_gone(procs, timeout=30)

    def wait_for_nodes(self, count: int, timeout: float = 60) -> list[dict]:
        """Wait until the GCS counts exactly ``count`` alive nodes, and they are the nodes whose process runs.

        Asked by a driver in a subprocess, so that this process stays free of Ray.

        Returns:
            ``ray.nodes()`` entries of the alive nodes.

        Raises:
            RuntimeError: Not reached in ``timeout`` seconds (with the last view seen).
        """
        expected = sorted(node.node_id for node in self.alive_nodes())
        code = f"""
            import json, time, ray
            ray.init(address={self.gcs_address!r}, logging_level="ERROR", log_to_driver=False)
            deadline, alive = time.monotonic() + {timeout}, []
            while time.monotonic() < deadline:
                alive = [n for n in ray.nodes() if n["Alive"]]
                ids = sorted(n["NodeID"] for n in alive)
                if len(ids) == {count} and (ids == {expected!r} or {count} != {len(expected)}):
                    break
                time.sleep(0.5)
            print("NODES=" + json.dumps(alive, default=str))
        """
        result = self.run_driver(code, timeout=timeout + 60)
        lines = [line for line in result.stdout.splitlines() if line.startswith("NODES=")]
        if result.returncode != 0 or not lines:
            raise RuntimeError(f"node query failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        alive = json.loads(lines[-1].removeprefix("NODES="))
        if len(alive) != count:
            ids = [n["NodeID"] for n in alive]
            raise RuntimeError(f"{len(alive)} nodes alive after {timeout:.0f} s, expected {count}: {ids}; "
                               f"running here: {expected}")
        return alive

    def run_driver(self, code: str, *, timeout: float = 120, cwd: Path | None = None,
                   env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` (dedented) as a driver of this cluster, in a subprocess.

        It gets :attr:`env` and ``RAY_ADDRESS``, then ``env`` (where a None
        value removes the variable), runs in ``cwd`` (default the
        workdir: a driver's folder goes onto its workers' sys.path, and the
        checkout would put an empty ``cluster`` namespace package there on a
        hidden node), and is killed with its process group after ``timeout``.

        Raises:
            RuntimeError: It ran longer than ``timeout`` (with the end of its output).
        """
        script = self.workdir / f"driver-{time.monotonic_ns()}.py"
        script.write_text(textwrap.dedent(code))
        merged = {**_clean_env(), **self.env, "RAY_ADDRESS": self.gcs_address, **(env or {})}
        full_env = {key: value for key, value in merged.items() if value is not None}
        process = subprocess.Popen([sys.executable, str(script)], cwd=cwd or self.workdir, env=full_env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise RuntimeError(f"driver ran past {timeout:.0f} s:\n{out[-2000:]}\n{err[-3000:]}") from None
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def processes(self, node: Node) -> list[int]:
        """PIDs of the live processes of ``node``: its `ray start` and every descendant."""
        return sorted(pid for pid, _ in self._tree([node.process.pid]))

    def our_processes(self) -> list[int]:
        """PIDs of every live process that belongs to this cluster.

        That is, every descendant of a node we started, and every process
        whose environment carries this cluster's marker (a worker orphaned
        by a killed raylet keeps it).
        """
        procs = self._tree(node.process.pid for node in self.nodes if node.running)
        return sorted({pid for pid, _ in procs | _marked(str(self.root))})

    def stop(self, grace: float = 20) -> None:
        """Stop every process this cluster started and remove its temporary folder.

        SIGTERM to each node's `ray start` (it drains and stops its own
        processes), worker nodes before the head; SIGKILL to whatever is left
        after ``grace`` seconds.
        """
        procs = self._tree(node.process.pid for node in self.nodes if node.running)
        for node in reversed(self.nodes):
            if node.running:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(node.running for node in self.nodes):
            procs |= self._tree(node.process.pid for node in self.nodes if node.running)
            time.sleep(0.2)
        procs |= self._seen | _marked(str(self.root))
        _signal_all(procs, signal.SIGKILL)
        for node in self.nodes:
            if node.running:
                node.process.kill()
            node.process.wait(timeout=30)
        _wait_gone(procs, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def _tree(self, pids: Iterable[int]) -> set[_Proc]:
        """``pids`` and all their descendants now, remembered for :meth:`stop`."""
        found = _descendants(pids)
        self._seen |= found
        return found


def start_cluster(workdir: Path, *, head_cpus: int = 1, hidden_paths: Iterable[Path] = (),
                  dashboard: bool | None = None, client: bool | None = None,
                  node_env: Mapping[str, str] | None = None, timeout: float = 90) -> RayTestCluster:
    """Start a head node on 127.0.0.2 with token authentication; add workers with :meth:`RayTestCluster.add_node`.

    Args:
        workdir: Folder for `ray start` logs and driver scripts (any length; Ray's own folder is a short one in /tmp).
        head_cpus: CPUs the head offers.
        hidden_paths: Folders (besides this checkout's flows/, tasks/ and cluster/) that hidden nodes see
            as empty; created here when missing, so that whatever is written there later stays hidden.
        dashboard: Run the dashboard (for Ray Jobs); default: when ray[default] is installed.
        client: Run the Ray Client server; default: when ray[client] is installed.
        node_env: Extra environment for every node process (over :data:`NODE_DEFAULTS`).
        timeout: Seconds to wait for the head.

    Raises:
        RuntimeError: The head did not start in time (with the end of its log), or a feature asked for
            is not installed.
    """
    dashboard = _installed("aiohttp", "dashboard (ray[default])", dashboard)
    client = _installed("grpc", "Ray Client (ray[client])", client)
    workdir.mkdir(parents=True, exist_ok=True)
    hidden = tuple(Path(p).resolve() for p in hidden_paths)
    for path in hidden:
        path.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tfray-", dir="/tmp"))
    gcs_port, dash_port, client_port = free_ports(3)
    cluster = RayTestCluster(
        workdir=workdir, root=root, gcs_address=f"{HEAD_IP}:{gcs_port}", token=secrets.token_hex(32),
        hidden_paths=hidden, dashboard_url=f"http://{HEAD_IP}:{dash_port}" if dashboard else None,
        client_address=f"ray://{HEAD_IP}:{client_port}" if client else None, node_env=dict(node_env or {}))
    args = ["--head", f"--port={gcs_port}", f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dash_port}",
            f"--include-dashboard={str(dashboard).lower()}", *_node_args(head_cpus, None)]
    if client:
        args.append(f"--ray-client-server-port={client_port}")
    cluster.nodes.append(_spawn(cluster, "head", args, hidden=False))
    try:
        _wait_started(cluster, cluster.head, timeout)
    except BaseException:
        cluster.stop(grace=5)
        raise
    return cluster


@functools.cache
def hiding_unsupported() -> str | None:
    """Why a hidden node cannot run here (no `unshare`, or no permission for a mount namespace), or None."""
    if not shutil.which("unshare"):
        return "`unshare` (util-linux) is not installed"
    with tempfile.TemporaryDirectory(prefix="tfray-probe-") as probe:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 f"mount -t tmpfs -o size=1m tfray-probe {shlex.quote(probe)}"],
                                capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {result.stderr.strip()}"
    return None


def _node_args(num_cpus: int, resources: Mapping[str, float] | None) -> list[str]:
    """`ray start` arguments every node gets: loopback address, CPUs, no GPU, a small object store."""
    args = [f"--node-ip-address={HEAD_IP}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--object-store-memory={128 * 1024 * 1024}", f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats", "--block"]
    if resources:
        args.append(f"--resources={json.dumps(dict(resources))}")
    return args


def _spawn(cluster: RayTestCluster, name: str, args: list[str], hidden: bool) -> Node:
    """Start one `ray start` process (inside a private mount namespace when ``hidden``).

    Each node gets its own ``--temp-dir``: without it a worker node uses the
    head's, as on a real cluster only a node that shares the head's disk could.
    A hidden node also sees the other nodes' folders as empty. The node runs in
    its folder, whose only entry is named so that it cannot shadow a module
    (a folder named ``ray`` there broke ``import ray`` in Ray Jobs' entrypoints).
    """
    temp_dir = cluster.root / name
    temp_dir.mkdir()
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", *args, f"--temp-dir={temp_dir / 'ray-temp'}"]
    if hidden:
        covers = [*PACKAGES, *cluster.hidden_paths, *(node.temp_dir for node in cluster.nodes)]
        mounts = "".join(f"mount -t tmpfs -o size=2g tfray-hidden {shlex.quote(str(p))} && " for p in covers)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts}exec {shlex.join(command)}"]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # `python` in a Ray Job
    env = {**_clean_env(), "PATH": path, **NODE_DEFAULTS, **cluster.node_env, **cluster.env,
           "RAY_TMPDIR": str(temp_dir), MARKER: str(cluster.root)}
    log_path = cluster.workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=temp_dir, env=env, start_new_session=True)
    return Node(name=name, process=process, temp_dir=temp_dir, log_path=log_path, hidden=hidden)


def _wait_started(cluster: RayTestCluster, node: Node, timeout: float) -> None:
    """Wait for `ray start`'s success line and the node's raylet; else stop the node and raise with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and node.running:
        if _READY in node.log_tail(100_000) and (node_id := _raylet_node_id(cluster, node)):
            node.node_id = node_id
            return
        time.sleep(0.2)
    why = "exited" if not node.running else f"did not start within {timeout:.0f} s"
    if node.running:
        cluster.kill_node(node)
    raise RuntimeError(f"Ray {node.name} on {HEAD_IP} {why}; the end of {node.log_path}:\n{node.log_tail()}")


def _raylet_node_id(cluster: RayTestCluster, node: Node) -> str:
    """The node id on the command line of the node's raylet, or "" while it has none."""
    for pid, _ in cluster._tree([node.process.pid]):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/raylet"):
            for arg in argv:
                if arg.startswith(b"--node_id="):
                    return arg.split(b"=", 1)[1].decode()
    return ""


def _clean_env() -> dict[str, str]:
    """This process's environment without Ray settings that would point a node or driver elsewhere.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which tests/conftest.py sets to keep a local Ray on loopback)
    makes `ray start --address` refuse to join; on Linux its default allows it.
    """
    drop = {"RAY_ADDRESS", "RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", MARKER}
    return {key: value for key, value in os.environ.items() if key not in drop}


def _installed(module: str, what: str, wanted: bool | None) -> bool:
    """Whether to run a feature that needs ``module``: as asked, or when installed if not asked."""
    present = importlib.util.find_spec(module) is not None
    if wanted and not present:
        raise RuntimeError(f"the {what} was asked for, but `{module}` is not installed in {sys.prefix}")
    return present if wanted is None else wanted


def running(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that still run (a zombie, killed but not yet reaped, does not)."""
    table = process_table()
    return sorted(pid for pid in pids if pid in table)


def _descendants(pids: Iterable[int]) -> set[_Proc]:
    """The live processes among ``pids`` and all their descendants, as (pid, start time)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = [pid for pid in pids if pid in table]
    found: set[_Proc] = set()
    while todo:
        pid = todo.pop()
        found.add((pid, table[pid][1]))
        todo.extend(children.get(pid, []))
    return found


def _marked(root: str) -> set[_Proc]:
    """Live processes whose environment carries ``MARKER=root``, never this process or its parent."""
    needle = f"{MARKER}={root}".encode()
    mine = {os.getpid(), os.getppid()}
    found = set()
    for pid, (_, started) in process_table().items():
        try:
            if pid not in mine and needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add((pid, started))
        except OSError:
            continue
    return found


def _wait_gone(procs: set[_Proc], timeout: float) -> None:
    """Wait until none of ``procs`` runs any more (a SIGKILLed process takes a moment to go)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _still_running(procs):
        time.sleep(0.05)


def _still_running(procs: Iterable[_Proc]) -> set[_Proc]:
    """Those of ``procs`` that are still the same running process."""
    table = process_table()
    return {(pid, started) for pid, started in procs if table.get(pid, (0, -1))[1] == started}


def _signal_all(procs: Iterable[_Proc], sig: signal.Signals) -> None:
    """Send ``sig`` to each (pid, start time) that is still that same process, never to this process."""
    for pid, _ in _still_running(procs):
        if pid != os.getpid():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
