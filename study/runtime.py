"""Starting or joining a Ray runtime, with safe defaults.

A local runtime gets the dashboard on 127.0.0.1 (another host only when the user sets
``resources.dashboard_host``) and its URL is printed. Ray's token authentication is left as Ray
configures it: this module never sets ``RAY_AUTH_MODE``.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

from study.experiment import ResourcesConfig

logger = logging.getLogger(__name__)

_BUSY = ("port %d on %s is taken (another Ray runtime or study on this machine?); the dashboard uses %d "
         "instead. Set resources.dashboard_port to choose one")
_NO_PORT = ("no free port for the Ray dashboard on {0} in {1}-{2}; set resources.dashboard_port to a free "
            "port, or resources.dashboard = false")
_PUBLIC = ("dashboard bound to %s: it is reachable from other machines; Ray's token authentication "
           "(~/.ray/auth_token) is what protects it")


def free_port(host: str, port: int, tries: int = 50) -> int:
    """``port`` if it can be bound on ``host``, else the next one that can (``tries`` ports in all)."""
    for candidate in range(port, port + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
        if candidate != port:
            logger.warning(_BUSY, port, host, candidate)
        return candidate
    raise RuntimeError(_NO_PORT.format(host, port, port + tries - 1))


def start_ray(res: ResourcesConfig, address: str = "") -> str | None:
    """Connect to ``address`` (``auto``, ``ray://host:port``, ``host:port``) or start a local runtime.

    Returns the dashboard URL when one is running, else ``None``.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # one checkpoint kept per trial makes Tune snapshot its state often; that is intended, not a problem
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = address or res.address
    if ray.is_initialized():
        return None
    if address:
        ctx = ray.init(address=address, log_to_driver=False)
        logger.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
    else:
        if res.dashboard and res.dashboard_host not in ("127.0.0.1", "localhost"):
            logger.warning(_PUBLIC, res.dashboard_host)
        port = free_port(res.dashboard_host, res.dashboard_port) if res.dashboard else res.dashboard_port
        ctx = ray.init(num_cpus=res.num_cpus or None, include_dashboard=res.dashboard,
                       dashboard_host=res.dashboard_host, dashboard_port=port, log_to_driver=False)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        url = url if url.startswith("http") else f"http://{url}"
        print(f"Ray dashboard: {url}", flush=True)
    return url


def trial_resources(res: ResourcesConfig) -> dict[str, float]:
    """CPUs and GPUs per trial; ``gpus_per_trial = -1`` shares each GPU among 4 trials when any exist."""
    gpus = res.gpus_per_trial
    if gpus < 0:
        gpus = 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    out = {"cpu": res.cpus_per_trial}
    if gpus > 0:
        out["gpu"] = gpus
    return out
