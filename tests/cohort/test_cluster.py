"""Where the work runs: the batch scripts dask-jobqueue writes for GPU workers (no Slurm or PBS can run
here, so the script is what can be checked), GPUs as a worker resource, and bad scheduler names."""

from __future__ import annotations

import pytest

pytest.importorskip("dask_jobqueue")


def test_slurm_job_script_for_a_gpu_worker():
    from stimage_nb.cluster import ClusterOptions, jobqueue_cluster

    o = ClusterOptions(gpus_per_worker=1, cores=8, memory="64GB", queue="gpu", account="pathology",
                       walltime="02:00:00", job_extra=("--constraint=a100",), prologue=("module load cuda/12.4",),
                       python="/opt/venv/bin/python", scheduler_host="127.0.0.1")
    c = jobqueue_cluster("slurm", o)
    try:
        s = c.job_script()
    finally:
        c.close()
    lines = s.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines                      # the batch system gives the job a GPU
    assert "#SBATCH --constraint=a100" in lines
    assert "#SBATCH -p gpu" in lines and "#SBATCH -A pathology" in lines and "#SBATCH -t 02:00:00" in lines
    assert "#SBATCH --cpus-per-task=8" in lines
    assert any(ln.startswith("#SBATCH --mem=") for ln in lines)
    assert "module load cuda/12.4" in lines
    worker = next(ln for ln in lines if "distributed.cli.dask_worker" in ln)
    assert worker.startswith("/opt/venv/bin/python -m distributed.cli.dask_worker tcp://127.0.0.1:")
    assert "--resources GPU=1" in worker                         # and Dask knows the worker has it
    assert "--nthreads 8" in worker
    # a CPU worker asks for no GPU at all
    c = jobqueue_cluster("slurm", ClusterOptions(cores=4, scheduler_host="127.0.0.1"))
    try:
        cpu = c.job_script()
    finally:
        c.close()
    assert "gres" not in cpu and "--resources" not in cpu


def test_pbs_job_script_for_a_gpu_worker():
    from stimage_nb.cluster import ClusterOptions, jobqueue_cluster

    c = jobqueue_cluster("pbs", ClusterOptions(gpus_per_worker=2, cores=16, memory="128GB", queue="gpuq",
                                               scheduler_host="127.0.0.1"))
    try:
        s = c.job_script()
    finally:
        c.close()
    assert "#PBS -l select=1:ncpus=16:mem=128gb:ngpus=2" in s.splitlines()
    assert "#PBS -q gpuq" in s and "--resources GPU=2" in s


def _where(x):
    from distributed import get_worker

    return x, get_worker().state.available_resources.get("GPU", 0)


def test_gpu_tasks_run_only_on_workers_with_the_gpu_resource():
    from stimage_nb.cluster import ClusterOptions, connect, run_tasks, task_resources

    assert task_resources(True) == {"GPU": 1} and task_resources(False) is None
    with connect("local", ClusterOptions(n_workers=1, processes=False, gpus_per_worker=1)) as client:
        info = client.scheduler_info()["workers"]
        assert [w["resources"] for w in info.values()] == [{"GPU": 1}]
        got = sorted(r for _, r, err in run_tasks(client, _where, [1, 2, 3], resources=task_resources(True),
                                                  progress=False) if err is None)
        # each task held the worker's only GPU while it ran (none left for another)
        assert got == [(1, 0), (2, 0), (3, 0)]


def _boom(x):
    if x == 2:
        raise ValueError("bad item")
    return x * 10


def test_a_failing_task_is_reported_and_the_others_finish():
    from stimage_nb.cluster import ClusterOptions, connect, run_tasks

    with connect("local", ClusterOptions(n_workers=2, processes=False)) as client:
        res = {i: (r, e) for i, r, e in run_tasks(client, _boom, [1, 2, 3], progress=False)}
    assert res[0] == (10, None) and res[2] == (30, None)
    assert res[1][0] is None and "bad item" in str(res[1][1])


def test_unknown_scheduler_is_a_clear_error():
    from stimage_nb.cluster import connect, jobqueue_cluster
    from stimage_nb.errors import StimageInputError

    with pytest.raises(StimageInputError, match="unknown scheduler 'kubernetes'"):
        with connect("kubernetes"):
            pass
    with pytest.raises(StimageInputError, match="slurm"):
        jobqueue_cluster("lsf")
