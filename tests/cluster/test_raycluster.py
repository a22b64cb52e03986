"""The multi-node test cluster itself (tests/raycluster.py): nodes, hiding, token auth, node loss, clean stop.

Every Ray driver here runs in a subprocess with the cluster's environment, so
that the pytest process never imports Ray and stays free to ray.init itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import raycluster
from tests.raycluster import CHECKOUT, RayTestCluster, start_cluster

# Every test here starts `ray start` processes; only the slow e2e tests use this cluster.
pytestmark = pytest.mark.slow
HIDING = raycluster.hiding_unsupported()
needs_hiding = pytest.mark.skipif(HIDING is not None, reason=f"no hidden node here: {HIDING}")

# A task pinned to one node (hard affinity) that says what that node can import and see.
PROBE = """
    import importlib, importlib.util, json, os, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def probe(path):
        out = {"node": ray.get_runtime_context().get_node_id(), "file": os.path.exists(path),
               "folder": sorted(os.listdir(os.path.dirname(path))) if os.path.isdir(os.path.dirname(path)) else None,
               "torch": importlib.util.find_spec("torch") is not None}
        for name in ("cluster", "cluster.execution.session"):
            try:
                out[name] = importlib.import_module(name).__file__
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        return out

    def on(node_id, path):
        return probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(path)
"""


def result(cluster: RayTestCluster, code: str, **kwargs) -> dict:
    """Run driver ``code`` that prints ``RESULT=<json>``; its parsed result (the driver must succeed)."""
    run = cluster.run_driver(code, **kwargs)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT=")]
    assert run.returncode == 0 and lines, \
        f"driver failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT="))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    """A head and one hidden node (offering the custom resource ``node2``), shared by the read-only tests."""
    if HIDING:
        pytest.skip(f"no hidden node here: {HIDING}")
    workdir = tmp_path_factory.mktemp("raycluster")
    cluster = start_cluster(workdir, hidden_paths=[workdir / "hidden"])
    try:
        cluster.add_node(num_cpus=1, hidden=True, resources={"node2": 1})
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.timeout(180)
def test_two_nodes_alive_on_loopback_each_with_its_own_folder(two_nodes):
    head, node = two_nodes.nodes
    alive = two_nodes.wait_for_nodes(2)

    assert sorted(n["NodeID"] for n in alive) == sorted([head.node_id, node.node_id])
    assert {n["NodeManagerAddress"] for n in alive} == {"127.0.0.2"}
    resources = {n["NodeID"]: n["Resources"] for n in alive}
    assert resources[node.node_id]["CPU"] == 1 and resources[node.node_id]["node2"] == 1
    assert resources[head.node_id]["CPU"] == 1 and "node2" not in resources[head.node_id]
    assert two_nodes.gcs_address.startswith("127.0.0.2:") and head.temp_dir != node.temp_dir
    assert len(str(head.temp_dir)) < 40  # room for Ray's session and socket names under the 107-char limit


@needs_hiding
@pytest.mark.timeout(180)
def test_hidden_node_sees_neither_the_checkout_nor_hidden_files_but_the_head_does(two_nodes):
    head, node = two_nodes.nodes
    secret = two_nodes.hidden_paths[0] / "secret.txt"
    secret.write_text("only on the driver's disk")
    out = result(two_nodes, PROBE + f"""
    ray.init(logging_level="ERROR")
    print("RESULT=" + json.dumps({{n: ray.get(on(n, {str(secret)!r})) for n in {[head.node_id, node.node_id]!r}}}))
    """)

    on_head, on_node = out[head.node_id], out[node.node_id]
    assert on_head["node"] == head.node_id and on_node["node"] == node.node_id  # the pins held
    assert on_head["file"] and on_head["folder"] == ["secret.txt"]
    assert on_head["cluster"] == str(CHECKOUT / "cluster" / "__init__.py")
    assert on_head["cluster.execution.session"] == str(CHECKOUT / "cluster" / "execution" / "session.py")
    assert not on_node["file"] and on_node["folder"] == []  # the folder is there, empty
    assert on_node["cluster"] == "ModuleNotFoundError: No module named 'cluster'"
    assert on_node["cluster.execution.session"].startswith("ModuleNotFoundError")
    assert on_node["torch"]  # the dependencies are there: only the project's own files are not


@needs_hiding
@pytest.mark.timeout(180)
def test_py_modules_in_the_runtime_env_ship_the_package_to_the_hidden_node(two_nodes):
    node = two_nodes.nodes[1]
    package = CHECKOUT / "cluster"
    out = result(two_nodes, PROBE + f"""
    ray.init(logging_level="ERROR", runtime_env={{"py_modules": [{str(package)!r}]}})
    print("RESULT=" + json.dumps(ray.get(on({node.node_id!r}, "/nonexistent/x"))))
    """)

    # Imported from the copy that Ray unpacked into that node's own folder, not from the checkout.
    assert out["cluster.execution.session"].startswith(str(node.temp_dir)), out
    assert out["cluster.execution.session"].endswith("/cluster/execution/session.py")


@pytest.mark.timeout(300)
def test_stop_leaves_no_process_and_no_folder_of_ours(tmp_path):
    cluster = start_cluster(tmp_path / "work")
    try:
        node = cluster.add_node(hidden=HIDING is None)
        # Busy workers on both nodes: stop must end them too, not only the node daemons.
        cluster.run_driver(f"""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init(logging_level="ERROR")
        @ray.remote(num_cpus=0)
        class Sleeper:
            def ping(self):
                return 1
        pinned = [NodeAffinitySchedulingStrategy(n, soft=False) for n in {[cluster.head.node_id, node.node_id]!r}]
        sleepers = [Sleeper.options(lifetime="detached", name=str(i), scheduling_strategy=pin).remote()
                    for i, pin in enumerate(pinned)]
        ray.get([s.ping.remote() for s in sleepers])
        """).check_returncode()
        before = cluster.our_processes()
        assert set(cluster.processes(cluster.head)) < set(before) and set(cluster.processes(node)) < set(before)
    finally:
        cluster.stop()

    assert cluster.our_processes() == []
    assert raycluster.running(before) == []
    assert not cluster.root.exists()


@pytest.mark.timeout(120)
def test_a_head_that_cannot_start_fails_with_its_log(tmp_path):
    before = set(Path("/tmp").glob("tfray-*"))
    expected = r"(?s)Ray head on 127\.0\.0\.2 exited; the end of .*head\.log:\n.*Resource quantities must be nonneg"
    with pytest.raises(RuntimeError, match=expected):
        start_cluster(tmp_path, head_cpus=-1)
    assert set(Path("/tmp").glob("tfray-*")) <= before  # its temporary folder is gone


@pytest.mark.timeout(120)
def test_a_head_that_does_not_start_in_time_is_stopped_with_a_clear_error(tmp_path):
    before = set(Path("/tmp").glob("tfray-*"))
    with pytest.raises(RuntimeError, match=r"Ray head on 127\.0\.0\.2 did not start within 1 s; the end of "):
        start_cluster(tmp_path, timeout=1)
    assert set(Path("/tmp").glob("tfray-*")) <= before
    ours = {None, *map(str, before)}
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _marker_of(pid) not in ours]


def _marker_of(pid: str) -> str | None:
    """The test cluster root that process ``pid`` belongs to, if any."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{raycluster.MARKER}=".encode()
    return next((e[len(prefix):].decode() for e in env if e.startswith(prefix)), None)
