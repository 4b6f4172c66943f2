"""Fixtures of the fleet's tests: a network lab and private etcd clusters on it, torn down whatever
the test does (every process killed and reaped, every namespace and data dir removed).

    from fleetfixtures import etcd1, etcd3, etcd_tls, lab  # noqa: F401

`etcd1`, `etcd3`, `etcd_tls` (1 member, TLS with client-certificate auth, no RBAC yet: call
`etcd_tls.fleet_roles([...])`) each bring their own lab: `cluster.lab.add_node(...)` for more hosts."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from pyexec.demo.etcdserver import EtcdCluster
from pyexec.demo.netlab import Lab

_seq = itertools.count()
# tmpfs: etcd fsyncs its WAL on every write, which a loaded disk makes slow enough to cost elections.
DATA_DIR = Path("/dev/shm")


def new_tag() -> str:
    """A lab tag unique among this machine's live fixtures: this process's pid and a counter."""
    return f"t{os.getpid()}x{next(_seq)}"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")


@pytest.fixture
def lab():
    """An empty Lab: add_node() hosts on its bridge."""
    _need_root()
    with Lab(new_tag()) as lb:
        yield lb


def _cluster(members: int, tls: bool):
    _need_root()
    with Lab(new_tag()) as lb:
        with EtcdCluster(lb, members=members, data_dir=DATA_DIR, tls=tls) as c:
            yield c


@pytest.fixture
def etcd1():
    """A 1-member etcd cluster (plain http) on its own lab."""
    yield from _cluster(1, False)


@pytest.fixture
def etcd3():
    """A 3-member etcd cluster (plain http) on its own lab."""
    yield from _cluster(3, False)


@pytest.fixture
def etcd_tls():
    """A 1-member etcd cluster with TLS and client-certificate auth on its own lab."""
    yield from _cluster(1, True)
