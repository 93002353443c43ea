"""Tuning sweeps on Ray (`ragserve tune ... --ray auto|ADDRESS|local`).

The driver (`ray_sweep`, called by tuning.run_tune) owns the profile directory: it computes
the cells still to run (resume, as in process), hands them to `SweepWorker` actors and appends
each record to records.jsonl as it comes back, so a killed driver loses at most the cells in
flight and a rerun skips the rest. Each worker is one Ray actor with its own runtime, built
from the driver's Config: an embedded engine (engine.backend local) or a client of the vLLM
endpoints (backend vllm); it runs one cell at a time, an idle engine as in process, so a
record's latency is the plan's own. Records come back in completion order, not sweep order.

Workers read the collection through the configured store: FAISS files need the same data dir
on every host (one machine, or a shared filesystem); retrieval.store: milvus with a server
URI serves any host. Milvus Lite opens its file in one process only: not for Ray workers.

"local" starts a private cluster listening on 127.0.0.1 only (one CPU per worker, a 200 MB
object store, no dashboard, no usage stats) and stops it at the end; an address or "auto" connects to a running
cluster and only removes this sweep's actors.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from typing import Any, Sequence

from ragserve.config import Config
from ragserve.errors import BadInput, RagServeError

logger = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 200 * 2**20
# Settings the workers must share with the driver (read by ragserve.config in each worker).
_ENV_KEYS = ("RAGSERVE_DATA", "RAGSERVE_CACHE", "RAGSERVE_DATASETS", "RAGSERVE_MODEL", "RAGSERVE_THREADS",
             "RAGSERVE_DTYPE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")


class _Worker:
    """One engine on one Ray worker (wrapped by ray.remote in `_actor_class`)."""

    def __init__(self, config: Config, dataset: str, collection: str, doc_filter: bool,
                 env: dict[str, str]) -> None:
        os.environ.update(env)
        from ragserve.controller import Controller
        from ragserve.eval.datasets import get_spec
        from ragserve.runtime import build_runtime

        self.loop = asyncio.new_event_loop()
        self.spec = get_spec(dataset)
        self.collection, self.doc_filter = collection, doc_filter
        self.runtime = build_runtime(config, metis=False)
        self.controller = Controller(self.runtime.engine, self.runtime.retriever, config)

    def warm_up(self, question: dict[str, Any]) -> int:
        from ragserve.eval.tuning import warm_up

        self.loop.run_until_complete(warm_up(self.controller, self.spec, question, self.collection, self.doc_filter))
        return os.getpid()

    def run(self, question: dict[str, Any], plan: Any) -> Any:
        from ragserve.eval.tuning import run_cell

        return self.loop.run_until_complete(run_cell(self.controller, self.spec, question, plan,
                                                     self.collection, self.doc_filter))

    def close(self) -> None:
        self.loop.run_until_complete(self.runtime.close())


def _actor_class():
    import ray

    return ray.remote(num_cpus=1)(_Worker)


def connect(address: str, num_workers: int | None) -> tuple[bool, str | None]:
    """ray.init for `address`; returns (this process started the cluster, its temp dir)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address == "local":
        # Ray swaps 127.0.0.1 for the host's reachable IP and its servers then listen on every
        # interface; as a single-host "cluster" (its macOS/Windows default) it keeps loopback.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Ray kills workers when the *host* passes 95% memory, whoever uses it; on a shared host
        # that ends a sweep for other jobs' memory. The kernel's OOM killer still guards.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    try:
        import ray
        from ray._private import ray_constants
    except ImportError:
        raise BadInput("--ray needs Ray: pip install -e '.[scale]'") from None
    if address == "local":
        ray_constants.ENABLE_RAY_CLUSTER = False     # read at import: Ray may be imported already
        temp_dir = tempfile.mkdtemp(prefix="ragserve-ray-", dir="/tmp")   # short: Ray's socket paths
        ray.init(address="local", num_cpus=num_workers or os.cpu_count() or 1, _node_ip_address="127.0.0.1",
                 object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, _temp_dir=temp_dir,
                 log_to_driver=False, configure_logging=False)
        return True, temp_dir
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BadInput(f"--ray {address}: cannot connect to a Ray cluster ({exc}); start one with "
                       "`ray start --head --node-ip-address 127.0.0.1`, or use --ray local") from None
    return False, None


def ray_sweep(settings: Any, config: Config, spec: Any, questions: Sequence[dict[str, Any]],
              collection: str, done: set[tuple[str, str]]) -> dict[str, Any]:
    """The sweep of tuning.run_tune with the cells run by Ray workers (module docstring);
    returns tuning.SweepStats.to_dict()."""
    import time

    import ray
    from tqdm import tqdm

    from ragserve.eval.tuning import SweepStats, append_record, sweep_cells

    todo = sweep_cells(settings, questions, done)
    if not todo:
        return SweepStats(0, 0, 0.0, 0.0).to_dict()
    t0 = time.perf_counter()
    if config.retrieval.store == "milvus" and config.retrieval.milvus.resolved_uri().endswith(".db"):
        raise BadInput("Ray workers cannot share a Milvus Lite file (one process per file): set "
                       "retrieval.milvus.uri to a Milvus server, or run the sweep without --ray")
    started, temp_dir = connect(settings.ray, settings.ray_workers)
    workers: list[Any] = []
    try:
        num = settings.ray_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        num = min(num, len(todo))
        env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
        actor = _actor_class()
        workers = [actor.remote(config, settings.dataset, collection, settings.doc_filter, env) for _ in range(num)]
        try:
            pids = ray.get([w.warm_up.remote(todo[0][0]) for w in workers])
        except ray.exceptions.RayError as exc:
            raise RagServeError(f"starting the Ray workers failed ({type(exc).__name__}: {exc})") from None
        logger.info("tune on Ray: %d cells over %d workers (pids %s)", len(todo), num, pids)
        t1 = time.perf_counter()
        queue = list(reversed(todo))
        in_flight: dict[Any, Any] = {}

        def submit(w: Any) -> None:
            if queue:
                q, plan = queue.pop()
                in_flight[w.run.remote(q, plan)] = w

        for w in workers:        # two per worker: the next cell waits in the actor, not on the network
            submit(w)
            submit(w)
        with tqdm(total=len(todo), desc=f"tune {settings.dataset} on {num} Ray workers", unit="run",
                  disable=not settings.progress) as bar:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                w = in_flight.pop(ready[0])
                try:
                    record = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    raise RagServeError(f"a Ray worker failed ({type(exc).__name__}: {exc}); the records so far "
                                        f"are kept: rerun the same command to resume") from None
                append_record(settings.out, record)
                bar.update(1)
                submit(w)
        stats = SweepStats(len(todo), num, t1 - t0, time.perf_counter() - t1)
        ray.get([w.close.remote() for w in workers])
        return stats.to_dict()
    finally:
        for w in workers:
            ray.kill(w)
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
