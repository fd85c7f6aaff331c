"""Horovod's Gloo rendezvous, served by us: the only module that touches `horovod.runner`.

horovodrun does three things for a Gloo job: it assigns slots (host, rank, local and cross
rank) to hosts, serves the rendezvous that the ranks' Gloo contexts meet at, and gives every
rank the variables that point it there. We do the same with Horovod's own functions, so that
ranks can be started without horovodrun's start-up cost on one host and without ssh across
hosts (every host starts its own slots). A Horovod upgrade has this file to check.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from horovod.runner.common.util.hosts import (
    SlotInfo,
    get_host_assignments,
    parse_host_files,
    parse_hosts,
)
from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars
from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

from pipeline.base.config import ConfigError
from tasks.train.errors import TrainingError

RENDEZVOUS_RETRY_S = 1.0
LOCAL_NAMES = ("localhost", "127.0.0.1")

__all__ = ["SlotInfo", "host_names", "job_variables", "rank_variables", "slot_plan"]


def slot_plan(hosts: str | None, hostfile: Path | None, num_proc: int) -> list[SlotInfo]:
    """Every rank's slot as horovodrun assigns them, hosts filled in order; a function of the
    arguments alone, so every host of a job computes the same plan."""
    if hostfile is not None:
        try:
            parsed = parse_host_files(str(hostfile))
        except (IndexError, ValueError) as exc:
            raise ConfigError(
                f"hostfile {hostfile}: expected lines 'HOST slots=N' ({exc})"
            ) from exc
    else:
        parsed = hosts or f"localhost:{num_proc}"
    try:
        return get_host_assignments(parse_hosts(parsed), num_proc, num_proc)
    except ValueError as exc:
        raise ConfigError(f"hosts {parsed!r}: {exc}") from exc


def host_names(hosts: str) -> list[str]:
    """The host names of HOST:SLOTS[,...], in order."""
    return [host.hostname for host in parse_hosts(hosts)]


def job_variables(address: str, iface: str, port: int) -> dict[str, str]:
    """The variables that point every rank of a job at its rendezvous."""
    return create_run_env_vars(address, [iface], str(port))


def rank_variables(slot: SlotInfo) -> dict[str, str]:
    """The variables that tell one rank who it is (HOROVOD_RANK, _SIZE, _LOCAL_RANK, ...)."""
    return create_slot_env_vars(slot)


@contextmanager
def rendezvous_server(address: str, port: int, plan: list[SlotInfo]) -> Iterator[int]:
    """Horovod's Gloo rendezvous for `plan` on `address`:`port` (port 0: any free one);
    yields the port; stopped on exit."""
    try:
        server = RendezvousHTTPServer((address, port), RendezvousHandler, 0)
    except OSError as exc:
        raise TrainingError(
            f"cannot serve the Gloo rendezvous on port {port}: {exc.strerror}"
        ) from exc
    server.init(plan)
    thread = threading.Thread(target=server.serve_forever, name="gloo-rendezvous", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def wait_for_rendezvous(host: str, port: int, timeout_s: float) -> str:
    """The IPv4 address of `host` once its rendezvous port accepts connections; retried for
    `timeout_s` seconds, since the hosts of a job start in any order."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            with socket.create_connection((address, port), timeout=RENDEZVOUS_RETRY_S):
                return address
        except OSError as exc:  # not resolvable yet, or nothing listening yet
            error = exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrainingError(
                f"no Gloo rendezvous at {host}:{port} after {timeout_s:g} s ({error}); "
                "host 0 (worker_index=0) of the job serves it"
            )
        time.sleep(min(RENDEZVOUS_RETRY_S, left))


def route_interface(address: str) -> str:
    """The network interface this host reaches `address` through (what Gloo must use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        # Connecting a UDP socket sends nothing: the kernel only picks route and source address.
        probe.connect((address, 9))
        source = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == source for a in addresses):
            return name
    raise TrainingError(
        f"no network interface holds {source}, this host's address towards {address}; "
        "set HOROVOD_GLOO_IFACE to the interface the hosts reach each other through"
    )
