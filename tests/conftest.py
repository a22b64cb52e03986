"""Shared fixtures: environment for local servers, tiny image datasets, one Ray per session."""

from __future__ import annotations

import faulthandler
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

# Set before anything imports ray or prefect: keeps Ray on loopback and Prefect offline.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A developer's own `trainflow up` (recorded in ~/.trainflow) must not serve the runs the tests start: they start
# their own services, and some look for Ray's processes among the run's children.
os.environ["TRAINFLOW_HOME"] = tempfile.mkdtemp(prefix="trainflow-test-home-")

# pytest-timeout (pyproject.toml: `timeout`, method signal) fails a test that overruns, and the session goes on.
# Its SIGALRM reaches Python code only: a hang inside C code that never returns to the interpreter (a stuck
# collective, a lock taken without the GIL released) would outlive it. This backstop dumps every thread's stack
# and ends the whole run HARD_TIMEOUT_GRACE seconds after a test's timeout, from faulthandler's own C thread.
HARD_TIMEOUT_GRACE = 120
_stderr_fd: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _stderr_fd
    _stderr_fd = os.dup(2)  # the terminal: capturing is suspended here, and it redirects fd 2 during tests


def pytest_unconfigure(config: pytest.Config) -> None:
    if _stderr_fd is not None:
        os.close(_stderr_fd)
    shutil.rmtree(os.environ["TRAINFLOW_HOME"], ignore_errors=True)


def _timeout_of(item: pytest.Item) -> float:
    """The test's pytest-timeout timeout: its marker, else --timeout, else the ini value (0: none)."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    else:
        value = item.config.getoption("timeout", None)
        value = item.config.getini("timeout") if value is None else value
    return float(value or 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Arm the backstop over the test's setup, call and teardown (pytest-timeout's span); pdb cancels it."""
    seconds = _timeout_of(item)
    if seconds <= 0 or _stderr_fd is None:
        return (yield)
    faulthandler.dump_traceback_later(seconds + HARD_TIMEOUT_GRACE, exit=True, file=_stderr_fd)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test session gets its own raw-data cache instead of ~/.cache/trainflow."""
    previous = os.environ.get("TRAINFLOW_CACHE_DIR")
    os.environ["TRAINFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("trainflow-cache"))
    yield
    if previous is None:
        os.environ.pop("TRAINFLOW_CACHE_DIR", None)
    else:
        os.environ["TRAINFLOW_CACHE_DIR"] = previous


# `make test` runs the suite in two processes (pytest-xdist, `-n 2`), in two lanes (the scheduler below). One takes,
# in order, every module that starts Ray, a flow or a `trainflow` run, or uses the session's servers; the other, the
# modules that need none of them, each whole in one process. Two Rays starting at once on two busy cores can starve a
# raylet past the fixed 30 s that Ray waits for it to register (`The current node timed out during startup`), so
# they never run side by side. A module below must not start Ray or `trainflow`, nor use the servers' fixtures
# (checked below).
NEEDS_NO_SERVER = frozenset({
    "tests/bench/test_gpu_fast_cifar.py",
    "tests/cluster/test_cifar10_recipes.py", "tests/cluster/test_fast_cifar.py",
    "tests/cluster/test_fast_cifar_muon.py", "tests/cluster/test_finetune.py", "tests/cluster/test_frameworks.py",
    "tests/cluster/test_models.py", "tests/cluster/test_nodecache.py", "tests/cluster/test_onnx.py",
    "tests/cluster/test_placement.py", "tests/cluster/test_ports.py", "tests/cluster/test_precision.py",
    "tests/cluster/test_stream.py", "tests/cluster/test_sweep.py", "tests/cluster/test_torch_allreduce.py",
    "tests/cluster/test_torch_backend.py", "tests/cluster/test_torch_loop.py", "tests/cluster/test_torch_sharded.py",
    "tests/deploy/test_configs.py", "tests/docs/test_docs.py",
    "tests/tasks/test_ingest.py", "tests/tasks/test_predict.py", "tests/tasks/test_preprocess.py",
    "tests/tasks/test_retry_policy.py", "tests/tasks/test_sources.py", "tests/tasks/test_store.py",
    "tests/tasks/test_store_contract.py", "tests/tasks/test_train.py",
    "tests/test_architecture.py", "tests/test_pins.py",
})
SERVERS_LANE = "servers"  # the one unit of work that holds every other module
SERVER_FIXTURES = frozenset({"ray_local", "s3_server", "mlflow_server", "_one_prefect_server"})
ROOT = Path(__file__).resolve().parents[1]


def lane(module: str) -> str:
    """The unit of work that the test module ``module`` (a path from the repository's root) belongs to."""
    return module if module in NEEDS_NO_SERVER else SERVERS_LANE


def module_of(item: pytest.Item) -> str:
    return Path(item.path).relative_to(ROOT).as_posix()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist's scheduler by scope, each scope a lane: the servers' modules in one process, in order, and
    each other module whole in whichever process is free."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid.split("::", 1)[0])

    return Lanes(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced = [f"{item.nodeid} uses {sorted(SERVER_FIXTURES & set(item.fixturenames))}" for item in items
                 if lane(module_of(item)) != SERVERS_LANE and SERVER_FIXTURES & set(item.fixturenames)]
    if misplaced:
        raise pytest.UsageError("tests/conftest.py: take these modules out of NEEDS_NO_SERVER, or the fixtures out of "
                                "their tests: " + "; ".join(misplaced))


@pytest.fixture(scope="session")
def _one_prefect_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Prefect server for every `trainflow` process the session's flow and end-to-end tests start.

    Without PREFECT_API_URL each run starts Prefect's temporary server and waits for it (about 5 s of a
    2-core machine's time per run, over dozens of runs). The tests of that temporary server, and the docs'
    commands run as a new user would, take PREFECT_API_URL out of their runs' environment.
    """
    wanted = any(Path(item.path).parent.name in ("flows", "e2e") for item in request.session.items)
    if not wanted or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from tests.prefectserver import start_prefect_server, stop

    api, process = start_prefect_server(tmp_path_factory.mktemp("prefect-session"))
    os.environ["PREFECT_API_URL"] = api
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        stop(process)


@pytest.fixture(autouse=True)
def _by_lane(request: pytest.FixtureRequest) -> None:
    """The servers' lane gets the session's Prefect server (started for its first test; the other lane needs none);
    under pytest-xdist, the light lane's process yields the CPU."""
    if lane(module_of(request.node)) == SERVERS_LANE:
        request.getfixturevalue("_one_prefect_server")
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        yield_the_cpu()


LIGHT_LANE_AUTOGROUP_NICE, LIGHT_LANE_NICE = 10, 19


@functools.cache  # once per process: it cannot be undone
def yield_the_cpu() -> None:
    """Let the process running the light lane (and what it starts) take only the CPU the servers' lane leaves.

    Ray runs its workers at nice 15, so a test process at nice 0 beside them took most of a shared core from a
    training worker, and two workers that wait on each other every step (DDP, TensorFlow's collectives) lost far
    more than that core. Linux shares CPU between sessions first (autogroups) and by nice only within one: the
    light lane gets a session of its own whose autogroup weighs little, and the lowest nice for kernels without
    autogroups. It also keeps to one core (every thread of the process, and what it starts, one torch thread):
    on both cores at the lowest weight, its two torch threads lost time to each other and the lane ran longer
    (docs/performance.md, the suite); the servers' lane has one core that the light lane never takes. Nothing
    here can be undone without privileges: it holds for the rest of the process's life (the servers' lane, the
    largest unit of work, is handed out first and runs first in its process, so it never follows this).
    """
    try:
        os.setsid()
        Path("/proc/self/autogroup").write_text(str(LIGHT_LANE_AUTOGROUP_NICE))
    except OSError:
        pass  # not Linux, no autogroups, or already a session leader
    os.setpriority(os.PRIO_PROCESS, 0, LIGHT_LANE_NICE)
    keep_to_one_core()


def keep_to_one_core() -> None:
    """Every thread of this process, and all it starts from now on, on the last core it may use; one thread for
    torch and for OpenMP in the processes it starts."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    for thread in os.listdir("/proc/self/task"):  # the affinity is each thread's own; new threads inherit it
        try:
            os.sched_setaffinity(int(thread), {cores[-1]})
        except OSError:
            pass  # the thread has ended
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def cores_for_tests() -> int:
    """The cores a test that trains in this process may use: one in the light lane under pytest-xdist
    (:func:`yield_the_cpu`), else all this process may run on."""
    return len(os.sched_getaffinity(0))


def pattern_image(label: int, size: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """A noisy image whose class is easy to learn: stripes of a class-specific orientation and colour."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = [(yy // 2) % 2, (xx // 2) % 2, ((xx + yy) // 2) % 2, np.zeros_like(xx)][label % 4].astype(np.float32)
    image = np.stack([base * (120 + 40 * ((label + c) % 3)) for c in range(3)], axis=-1)
    image += rng.normal(0, 20, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image[..., 0] if channels == 1 else image


def write_class_folders(root: Path, classes: int = 3, per_class: int = 20, size: int = 20, channels: int = 3,
                        suffix: str = ".png", seed: int = 0) -> Path:
    """Write ``root/<class>/<n><suffix>`` images of the pattern above."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern_image(label, size, rng, channels)).save(folder / f"{i:04d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``image_folder(name, **kwargs)`` writes a class-folder dataset under tmp_path."""
    return lambda name="images", **kwargs: write_class_folders(tmp_path / name, **kwargs)


def run_threads(target: Callable[..., None], args: list[tuple], timeout: float = 120) -> None:
    """Run ``target(*a)`` for every ``a`` in ``args`` on its own thread, all at once, and wait for them."""
    threads = [threading.Thread(target=target, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def make_tar(source: Path, archive: Path, arcname: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname or source.name)
    return archive


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1 with a fresh bucket.

    Its endpoint and credentials go into the standard AWS environment variables
    for the session: the only way trainflow learns them.
    """
    from tests import s3server

    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    saved = {key: os.environ.get(key) for key in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server (SQLite backend, artifacts in the S3 server's bucket) on 127.0.0.1."""
    from tests import mlflowserver

    if reason := mlflowserver.unavailable():
        pytest.skip(reason)
    server = mlflowserver.start(tmp_path_factory.mktemp("mlflow"), s3_server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server) -> Iterator[None]:
    """One local Ray for the session; tests that train reuse it instead of starting their own.

    Started after the S3 server so that its workers inherit the AWS environment,
    as a real cluster's workers have their own credentials.
    """
    from cluster.execution import session as runtime

    runtime.prestart(None)
    with runtime.ray_session(None):  # waits until Ray is up
        yield
    runtime.shutdown()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    """A small, easy, prepared RGB dataset in a file store: (store_uri, PreparedData)."""
    from tasks.ingest import ingest
    from tasks.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("prepared")
    write_class_folders(root / "images", classes=3, per_class=80, size=16)
    raw = ingest(f"folder:{root / 'images'}", root / "cache")
    store_uri = str(root / "store")
    return store_uri, preprocess(raw, PreprocessConfig(image_size=16, test_fraction=0.25), store_uri)


def descendants(root: int) -> list[int]:
    """Every process whose parent chain reaches ``root``, read from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def needs_native_bf16(still_covered_by: str) -> pytest.MarkDecorator:
    """Skip a test that trains in bf16 on the CPU where the CPU emulates it (about ten times slower than fp32,
    docs/performance.md), saying what still covers it there."""
    from cluster.precision import BF16_CPU_FLAGS, cpu_flags

    return pytest.mark.skipif(not BF16_CPU_FLAGS & cpu_flags(), reason=(
        "this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 is emulated, about ten times slower than fp32, and "
        f"auto never trains in it here; {still_covered_by}"))


# TensorFlow Datasets is the tensorflow extra, which `make test` installs; without it the tfds tests skip
needs_tfds = pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None,
                                reason="tensorflow_datasets is not installed: pip install 'trainflow[tensorflow]'")


@pytest.fixture(scope="session")
def tfds_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real, small TFDS datasets (see tests/tfds_build.py): ``<dir>/base`` and ``<dir>/rebuilt`` data dirs.

    Built in a child process: TensorFlow must not load in this one, which imports torch.
    """
    if importlib.util.find_spec("tensorflow_datasets") is None:
        pytest.skip("tensorflow_datasets is not installed: pip install 'trainflow[tensorflow]'")
    out = tmp_path_factory.mktemp("tfds")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    built = subprocess.run([sys.executable, "-m", "tests.tfds_build", str(out)], cwd=Path(__file__).parents[1],
                           env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    return out
