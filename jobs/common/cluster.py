"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from m2f.jobs.common.lifecycle import Stop

# Ray Train's placement-group cleaner polls the State API, which needs the dashboard (ray[default]);
# without it, it warns every second for the whole run. Progress is ours to report.
_QUIET_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
}


OOM_RETRIES = 3  # tries of a task killed for memory, after the first, on a Ray this job starts


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process (worker_process_setup_hook) and in the driver."""
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:  # Ray Train v2 logs every report at INFO through a logger named after its file path
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _no_auto_init() -> None:
    """Ray starts (or joins) a cluster by itself when a Ray call finds none; for a job that has shut its
    Ray down on purpose, a late call from a library thread must fail, not start a second Ray. The switch is
    read from RAY_ENABLE_AUTO_CONNECT when Ray is imported, so set it on the loaded module as well."""
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    except (ImportError, AttributeError):
        pass


def _no_native_signal_handler() -> None:
    """Ray's core installs a native handler for SIGTERM (and the crash signals) that prints a stack dump
    and aborts, and on shutdown resets SIGTERM to the default action: a scheduler's SIGTERM during
    ray.shutdown() then killed the driver mid-shutdown, leaving Ray's processes and a 'running' report
    behind. Without it, SIGTERM stays with the job's own handler (common/lifecycle.py) from start to end.
    Ray reads the switch from RAY_DISABLE_FAILURE_SIGNAL_HANDLER when it is imported (so set the loaded
    module's constant too); the environment carries it to the processes a local Ray starts."""
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] != "1":
        return  # the user asked for Ray's handler
    try:
        from ray._private import ray_constants

        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    except (ImportError, AttributeError):
        pass


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Connect to `address` (an existing cluster), reuse an in-process Ray, or start a local one.

    Returns True when this call started Ray, i.e. the caller should shut it down when done.
    """
    import ray

    quiet_worker_logs()
    _no_auto_init()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    _no_native_signal_handler()
    kwargs = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "runtime_env": {"worker_process_setup_hook": "m2f.jobs.common.cluster.quiet_worker_logs"},
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        # A task its worker's memory monitor kills is retried forever by default (Ray's task_oom_retries):
        # one image that no reservation covers would then hold a run for good. A joined cluster keeps its
        # own setting (set RAY_task_oom_retries where it starts); the user's variable wins here too.
        os.environ.setdefault("RAY_task_oom_retries", str(OOM_RETRIES))
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


@contextlib.contextmanager
def ray_session(address: str | None, stop: Stop | None = None) -> Iterator[None]:
    """Ray for the length of the block: joined (`address`), reused (already initialised in this process),
    or started locally. Only a Ray started or joined here is shut down here (which ends this job's tasks
    and actors on a cluster, and every Ray process of a local Ray)."""
    import ray

    started = True
    try:
        started = connect(address)
        if stop is not None:
            stop.install()  # ray.init() put its own SIGTERM handler in place of ours
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
