"""The Ray a command runs on: the spec's cluster, or a local Ray started for the command and shut down after."""

from __future__ import annotations

import contextlib
import logging

from .config import JobSpec


@contextlib.contextmanager
def ray_session(spec: JobSpec):
    """Connect to the spec's Ray address, or start a local Ray in-process; shut down what we started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if spec.resources.address:
        ray.init(address=spec.resources.address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        # The dashboard (loopback only) serves the State API that Ray Train's placement-group cleaner polls.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
