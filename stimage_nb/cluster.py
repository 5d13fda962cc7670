"""Where independent work runs: a Dask cluster on this machine, an existing scheduler, or Slurm/PBS jobs.

One home for the package's parallel execution (cohort prediction, ensemble members trained in
parallel). The caller names a *scheduler* and gets a :class:`distributed.Client`; the work itself is
always ``client.map(fn, items)`` with :func:`distributed.as_completed` driving a progress bar
(:func:`run_tasks`), so a laptop, a workstation's GPUs and a Slurm cluster are the same code path:

- ``"local"`` (default): a :class:`distributed.LocalCluster` on this machine (worker processes, one
  thread each: torch in every worker then uses one core and the workers do not fight over them);
- ``"tcp://host:port"`` (any address): an already running scheduler (e.g. ``dask scheduler`` on a
  login node with workers started by hand);
- ``"slurm"`` / ``"pbs"``: a :class:`dask_jobqueue.SLURMCluster` / ``PBSCluster`` that submits one batch
  job per worker (:func:`jobqueue_cluster`; check the script with ``cluster.job_script()``).

GPUs are a **worker resource** (``--resources GPU=n`` on each worker, ``resources={"GPU": 1}`` on each
task; :func:`task_resources`): a GPU worker runs one GPU task at a time and a task never lands on a
worker without one, and the task function does not change (the device policy is
:mod:`stimage_nb.devices`: ``"auto"`` takes the worker's GPU).

Sources: the dask.distributed docs (LocalCluster, Client.map, as_completed, worker resources) and
dask-jobqueue's (SLURMCluster/PBSCluster, ``job_extra_directives``, ``worker_extra_args``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .errors import StimageInputError

log = logging.getLogger(__name__)

#: Names ``scheduler`` may take besides an address.
KINDS = ("local", "slurm", "pbs")


@dataclass(frozen=True)
class ClusterOptions:
    """How to start workers (ignored for an existing scheduler address, which has its own).

    Attributes
    ----------
    n_workers
        Workers (local: default ``min(2, cores)``; slurm/pbs: jobs to submit, default 1).
    threads_per_worker
        Task threads per worker (1: one slide or member at a time per worker).
    processes
        Local workers as processes (True) or threads of this process (False: cheaper to start, one
        Python interpreter shared by all, used by the tests).
    memory
        Memory per worker or job, e.g. ``"16GB"`` (local: ``"auto"`` = the machine's memory / workers).
    gpus_per_worker
        GPUs each worker owns; > 0 gives workers the resource ``GPU`` and Slurm jobs ``--gres=gpu:n``
        (PBS: ``ngpus=n`` in the select statement).
    cores
        CPU cores per Slurm/PBS job.
    queue, account, walltime
        Batch-system partition/queue, account to charge, and job time limit (``HH:MM:SS``).
    job_extra
        Extra ``#SBATCH``/``#PBS`` directives, e.g. ``("--constraint=a100",)``.
    prologue
        Shell lines run before each worker starts (``module load cuda``, activating an environment).
    python
        Python executable on the compute nodes (default: this one).
    local_directory
        Worker scratch space (default: Dask's).
    scheduler_host
        Interface/host the scheduler of a local or jobqueue cluster listens on (default: Dask's choice).
    """

    n_workers: int | None = None
    threads_per_worker: int = 1
    processes: bool = True
    memory: str | None = None
    gpus_per_worker: int = 0
    cores: int = 4
    queue: str | None = None
    account: str | None = None
    walltime: str = "04:00:00"
    job_extra: Sequence[str] = field(default_factory=tuple)
    prologue: Sequence[str] = field(default_factory=tuple)
    python: str | None = None
    local_directory: str | None = None
    scheduler_host: str | None = None


def task_resources(gpu: bool) -> dict | None:
    """The ``resources=`` of a task: ``{"GPU": 1}`` when it needs a GPU, else ``None``."""
    return {"GPU": 1} if gpu else None


def jobqueue_cluster(kind: str = "slurm", options: ClusterOptions | None = None, **kw):
    """A :class:`dask_jobqueue.SLURMCluster` or ``PBSCluster`` for ``options`` (not yet scaled).

    Each job runs one worker on ``options.cores`` cores (Dask's ``--nthreads`` = ``cores``: the
    jobqueue default of one thread per core). GPU jobs ask the batch
    system for the GPUs (Slurm ``--gres=gpu:n``, PBS ``ngpus=n``) and declare them to Dask as the
    worker resource ``GPU``. ``kw`` are passed to the cluster class as they are (e.g.
    ``scheduler_options``). Inspect the generated batch script with ``cluster.job_script()``.
    """
    o = options or ClusterOptions()
    if kind not in ("slurm", "pbs"):
        raise StimageInputError(f"unknown batch system {kind!r}; use 'slurm' or 'pbs'.")
    import sys

    extra_args = ["--resources", f"GPU={o.gpus_per_worker}"] if o.gpus_per_worker else []
    directives = list(o.job_extra)
    common = dict(cores=max(o.threads_per_worker, o.cores), processes=1, memory=o.memory or "16GB",
                  walltime=o.walltime, queue=o.queue, account=o.account, worker_extra_args=extra_args,
                  job_script_prologue=list(o.prologue), python=o.python or sys.executable,
                  local_directory=o.local_directory)
    sched = dict(kw.pop("scheduler_options", {}) or {})
    if o.scheduler_host:
        sched.setdefault("host", o.scheduler_host)
    sched.setdefault("dashboard_address", ":0")
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster

        if o.gpus_per_worker:
            directives.append(f"--gres=gpu:{o.gpus_per_worker}")
        return SLURMCluster(job_extra_directives=directives, scheduler_options=sched, **common, **kw)
    from dask_jobqueue import PBSCluster

    cores = common["cores"]
    spec = f"select=1:ncpus={cores}:mem={_pbs_mem(common['memory'])}"
    if o.gpus_per_worker:
        spec += f":ngpus={o.gpus_per_worker}"
    return PBSCluster(resource_spec=spec, job_extra_directives=directives, scheduler_options=sched, **common, **kw)


def _pbs_mem(memory: str) -> str:
    """'16GB' -> '16gb' (PBS units are lower case)."""
    return str(memory).replace(" ", "").lower()


def _local_cluster(o: ClusterOptions):
    from distributed import LocalCluster

    n = o.n_workers or max(1, min(2, os.cpu_count() or 1))
    kw: dict[str, Any] = dict(n_workers=n, threads_per_worker=o.threads_per_worker, processes=o.processes,
                              dashboard_address=":0", memory_limit=o.memory or "auto")
    if o.gpus_per_worker:
        kw["resources"] = {"GPU": o.gpus_per_worker}
    if o.local_directory:
        kw["local_directory"] = o.local_directory
    if o.scheduler_host:
        kw["host"] = o.scheduler_host
    return LocalCluster(**kw)


def check_scheduler(scheduler) -> None:
    """Raise :class:`StimageInputError` now for a scheduler :func:`connect` would not understand."""
    if scheduler is None or not isinstance(scheduler, str):
        return
    if scheduler not in KINDS and "://" not in scheduler and ":" not in scheduler:
        raise StimageInputError(f"unknown scheduler {scheduler!r}: use 'local', 'slurm', 'pbs' or a scheduler "
                                "address such as tcp://host:8786.")


@contextlib.contextmanager
def connect(scheduler: "str | Any | None" = "local", options: ClusterOptions | None = None) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``scheduler``; closes what it started on exit.

    Parameters
    ----------
    scheduler
        ``"local"`` (or ``None``), ``"slurm"``, ``"pbs"``, a scheduler address (``"tcp://10.0.0.5:8786"``,
        ``"host:8786"``), or an existing ``distributed.Client`` (used as it is, not closed).
    options
        :class:`ClusterOptions` for the workers this starts.

    Raises
    ------
    StimageInputError
        An unknown scheduler name, or an address no scheduler answers at (within 30 s).
    """
    from distributed import Client

    o = options or ClusterOptions()
    if isinstance(scheduler, Client):
        yield scheduler
        return
    s = "local" if scheduler is None else str(scheduler)
    check_scheduler(s)
    cluster = None
    if s == "local":
        cluster = _local_cluster(o)
        target = cluster
    elif s in ("slurm", "pbs"):
        cluster = jobqueue_cluster(s, o)
        cluster.scale(jobs=o.n_workers or 1)
        log.info("submitted %d %s job(s) for Dask workers:\n%s", o.n_workers or 1, s, cluster.job_script())
        target = cluster
    else:
        target = s
    try:
        try:
            client = Client(target, timeout="30s")
        except OSError as e:
            raise StimageInputError(f"cannot reach the Dask scheduler at {s} ({e}); is it running?") from e
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def run_tasks(client, fn: Callable, items: Sequence, *, keys: Sequence[str] | None = None,
              resources: dict | None = None, progress: bool = True, desc: str = "tasks",
              unit: str = "task") -> Iterator[tuple[int, Any, BaseException | None]]:
    """Run ``fn(item)`` for every item on the cluster; yield ``(index, result, error)`` as each finishes.

    ``client.map`` submits one task per item (``pure=False``: every call runs, even for equal
    items) and :func:`distributed.as_completed` yields them in the order they finish, driving a
    ``tqdm.auto`` bar. A task that raises, or whose worker died (``KilledWorker``), is yielded with
    its exception instead of stopping the others.
    """
    from distributed import as_completed

    if not items:
        return
    kw: dict[str, Any] = {"pure": False}
    if keys is not None:
        kw["key"] = list(keys)
    if resources:
        kw["resources"] = resources
    futures = client.map(fn, list(items), **kw)
    index = {f.key: i for i, f in enumerate(futures)}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(futures), desc=desc, unit=unit)
    try:
        for fut in as_completed(futures):
            i = index[fut.key]
            try:
                res, err = fut.result(), None
            except Exception as e:  # noqa: BLE001 - reported per task; the others go on
                res, err = None, e
            if bar is not None:
                bar.update(1)
            yield i, res, err
            fut.release()
    finally:
        if bar is not None:
            bar.close()
