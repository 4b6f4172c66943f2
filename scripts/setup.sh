#!/usr/bin/env bash
# Sets a fresh Debian machine up for pyexec, as root: system tools, a venv, the native build.
# Idempotent: a second run only rebuilds the package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need=()
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v fsfreeze >/dev/null || need+=(util-linux)
command -v losetup >/dev/null || need+=(mount)
command -v gcc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

# invoke-rc.d and deb-systemd-invoke ask policy-rc.d(8) first: 101 = "action forbidden", so no
# package installed between these two starts its service.  A policy the machine already has (a
# Docker image ships one) is left as it is.
own_policy=
forbid_services() {
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
}
allow_services() {
    if [ -n "$own_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
        own_policy=
    fi
}

# The database servers the tests and the demo run as private instances (pyexec/demo/servers.py):
# the packages' own clusters and services are neither needed nor wanted.
PG=/usr/lib/postgresql/15/bin
dbneed=()
[ -x $PG/postgres ] && [ -x $PG/initdb ] || dbneed+=(postgresql-15)
[ -x $PG/pgbench ] && [ -x $PG/pg_amcheck ] || dbneed+=(postgresql-contrib)
command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null || dbneed+=(mariadb-server)
command -v mariadb >/dev/null && command -v mariadb-admin >/dev/null || dbneed+=(mariadb-client)
online_clusters() { command -v pg_lsclusters >/dev/null && pg_lsclusters -h | awk '$4 == "online" {print $1, $2}' || :; }
if ((${#dbneed[@]})); then
    echo "setup: installing ${dbneed[*]}"
    export DEBIAN_FRONTEND=noninteractive
    before=$(online_clusters)
    forbid_services
    apt-get update -qq
    if [[ " ${dbneed[*]} " == *" postgresql-15 "* ]]; then
        # postgresql-15's postinst creates and starts a "main" cluster unless postgresql-common's
        # createcluster.conf says create_main_cluster = false (pg_createcluster(1)); that file
        # belongs to postgresql-common, so it is installed first and set before the server comes.
        apt-get install -y -qq postgresql-common >/dev/null
        conf=/etc/postgresql-common/createcluster.conf
        if ! grep -Eq '^[[:space:]]*create_main_cluster[[:space:]]*=[[:space:]]*false' $conf; then
            sed -i -E '/^[[:space:]]*create_main_cluster[[:space:]]*=/d' $conf
            echo 'create_main_cluster = false' >>$conf
        fi
    fi
    apt-get install -y -qq "${dbneed[@]}" >/dev/null
    allow_services
    # Whatever started anyway (an init that ignores policy-rc.d) is stopped: only what this install
    # started, never a cluster that was running before it.
    if [[ " ${dbneed[*]} " == *" mariadb-server "* ]]; then
        if [ -d /run/systemd/system ]; then
            systemctl stop mariadb.service 2>/dev/null || :
        elif [ -S /run/mysqld/mysqld.sock ]; then
            mariadb-admin --socket=/run/mysqld/mysqld.sock shutdown 2>/dev/null || :
        fi
    fi
    after=$(online_clusters)
    while read -r ver name; do
        [ -n "$ver" ] && ! grep -qx "$ver $name" <<<"$before" && pg_ctlcluster "$ver" "$name" stop || :
    done <<<"$after"
fi

# etcd for the fleet (pyexec.fleet) and the private clusters its tests run on lab namespaces
# (pyexec/demo/etcdserver.py): the package's own service is not wanted either.
etcdneed=()
[ -x /usr/bin/etcd ] || etcdneed+=(etcd-server)
[ -x /usr/bin/etcdctl ] || etcdneed+=(etcd-client)
command -v ip >/dev/null && command -v nsenter >/dev/null || etcdneed+=(iproute2 util-linux)
command -v openssl >/dev/null || etcdneed+=(openssl)
if ((${#etcdneed[@]})); then
    echo "setup: installing ${etcdneed[*]}"
    export DEBIAN_FRONTEND=noninteractive
    forbid_services
    etcd_was_running=
    [ -d /run/systemd/system ] && systemctl is-active --quiet etcd.service && etcd_was_running=1
    apt-get update -qq
    apt-get install -y -qq "${etcdneed[@]}" >/dev/null
    allow_services
    if [[ " ${etcdneed[*]} " == *" etcd-server "* ]] && [ -z "$etcd_was_running" ] && [ -d /run/systemd/system ]; then
        systemctl stop etcd.service 2>/dev/null || :
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
# A clean build each time: setuptools does not notice every change to the static core.
rm -rf build
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps .
case $VENV in /*) PY=$VENV/bin/python ;; *) PY=$PWD/$VENV/bin/python ;; esac
echo "setup: pyexec built ($(cd / && "$PY" -c 'from pyexec import native; print(", ".join(native.load(n).name for n in ("cython", "cffi")))') backends)"
