# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython binding of the native core: argument conversion only, GIL released around
every call that can block.  Policy lives in pyexec/; errors are built in pyexec/errors."""
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport malloc, free

from pyexec import errors

cdef extern from "pyexec_core.h" nogil:
    ctypedef struct px_set:
        pass
    ctypedef struct px_capture:
        pass
    ctypedef struct px_proc:
        int32_t pid
        int32_t pidfd
        int32_t out_fd
        int32_t err_fd
    ctypedef struct px_status:
        int32_t code
        int32_t signal
        int32_t core
        int64_t utime_ns
        int64_t stime_ns
        int64_t maxrss_kb
        int64_t exit_seen_ns
    ctypedef struct px_features:
        int32_t pidfd_open
        int32_t waitid_pidfd
        int32_t clone3_cgroup
        int32_t close_range_cloexec
        int32_t cgroup_kill
        int32_t cgroup_freeze
        int32_t openat2
        int32_t cgroup2
        int32_t cgroup_v1
    int PX_MAX_MOUNTS
    int px_probe(px_features *f)
    int64_t px_now_ns()
    int px_set_init(px_set *s, const int32_t *fds, int32_t n)
    int px_freeze(px_set *s, int32_t flags)
    int px_thaw(px_set *s, int32_t flags)
    int px_rcu_restore(px_set *s)
    int px_spawn(const char *path, int exec_fd, char *const *argv, char *const *envp,
                 int cgroup_fd, px_proc *p)
    enum: PX_MAX_CGROUPS
    int px_spawn_helper(const char *path, int exec_fd, char *const *argv, char *const *envp,
                        const int32_t *cgroup_fds, int32_t n, px_proc *p)
    int px_wait(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
                px_capture *err, px_status *st)
    int px_kill_tree(const px_proc *p, int cgroup_fd, int64_t grace_ns, int64_t kill_wait_ns,
                     px_capture *out, px_capture *err, px_status *st)
    const long long PX_KILL_WAIT_NS
    int px_watch_parent(int parent, int life_fd, int death_sig, int32_t *fd)

NAME = "cython"
SET_SIZE = sizeof(px_set)
CAPTURE_SIZE = sizeof(px_capture)
MAX_MOUNTS = PX_MAX_MOUNTS
KILL_WAIT_NS = PX_KILL_WAIT_NS


cdef px_set *_set(unsigned char[::1] buf) except NULL:
    if buf.shape[0] < sizeof(px_set):
        raise ValueError("freeze set buffer too small")
    return <px_set *>&buf[0]


cdef px_capture *_cap(object buf) except? NULL:
    cdef unsigned char[::1] view
    if buf is None:
        return NULL
    view = buf
    if view.shape[0] < sizeof(px_capture):
        raise ValueError("capture buffer too small")
    return <px_capture *>&view[0]


cdef char **_strv(list items) except NULL:
    cdef char **v = <char **>malloc((len(items) + 1) * sizeof(char *))
    if v == NULL:
        raise MemoryError()
    for i, item in enumerate(items):
        v[i] = <char *>item
    v[len(items)] = NULL
    return v


cdef tuple _status(px_status *st):
    return (st.code, st.signal, st.core, st.utime_ns, st.stime_ns, st.maxrss_kb, st.exit_seen_ns)


def probe():
    """The kernel features in use (1) or replaced by a fallback (0), in px_features order."""
    cdef px_features f
    px_probe(&f)
    return (f.pidfd_open, f.waitid_pidfd, f.clone3_cgroup, f.close_range_cloexec, f.cgroup_kill,
            f.cgroup_freeze, f.openat2, f.cgroup2, f.cgroup_v1)


def now_ns():
    """CLOCK_MONOTONIC in ns, as the core stamps it."""
    return px_now_ns()


def set_init(buf, fds):
    """Load fds into the freeze set in buf; returns 0 or -errno."""
    cdef px_set *s = _set(buf)
    cdef int32_t *arr
    cdef int n = len(fds)
    cdef int rc
    arr = <int32_t *>malloc((n + 1) * sizeof(int32_t))
    if arr == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            arr[i] = fds[i]
        rc = px_set_init(s, arr, n)
    finally:
        free(arr)
    return rc


def freeze(buf, int flags):
    """FIFREEZE the set in order; returns 0 or -errno of the first failure."""
    cdef px_set *s = _set(buf)
    cdef int rc
    with nogil:
        rc = px_freeze(s, flags)
    return rc


def thaw(buf, int flags):
    """FITHAW what the set says is ours, in reverse; returns 0 or the first -errno."""
    cdef px_set *s = _set(buf)
    cdef int rc
    with nogil:
        rc = px_thaw(s, flags)
    return rc


def rcu_restore(buf):
    """Put rcu_expedited back if the set says it is still ours to restore."""
    cdef px_set *s = _set(buf)
    return px_rcu_restore(s)


def spawn(path, int exec_fd, list argv, list env, int cgroup_fd=-1):
    """Spawn argv; returns (pid, pidfd, out_fd, err_fd) or raises OSError."""
    cdef px_proc p
    cdef char **cargv = NULL
    cdef char **cenv = NULL
    cdef const char *cpath = NULL
    cdef bytes bpath = None
    cdef int rc
    if path is not None:
        bpath = path
        cpath = bpath
    cargv = _strv(argv)
    try:
        cenv = _strv(env)
        with nogil:
            rc = px_spawn(cpath, exec_fd, cargv, cenv, cgroup_fd, &p)
    finally:
        free(cargv)
        free(cenv)
    if rc < 0:
        raise errors.oserror(-rc, "spawn", path if path is not None else argv[0])
    return (p.pid, p.pidfd, p.out_fd, p.err_fd)


def spawn_helper(path, int exec_fd, list argv, list env, list cgroup_fds):
    """Spawn a helper into cgroup_fds; returns (pid, pidfd, out_fd, err_fd) or raises OSError."""
    cdef px_proc p
    cdef char **cargv = NULL
    cdef char **cenv = NULL
    cdef const char *cpath = NULL
    cdef bytes bpath = None
    cdef int32_t fds[PX_MAX_CGROUPS]
    cdef int32_t n = len(cgroup_fds)
    cdef int rc
    if n > PX_MAX_CGROUPS:
        raise ValueError(f"at most {PX_MAX_CGROUPS} cgroups")
    for i, fd in enumerate(cgroup_fds):
        fds[i] = fd
    if path is not None:
        bpath = path
        cpath = bpath
    cargv = _strv(argv)
    try:
        cenv = _strv(env)
        with nogil:
            rc = px_spawn_helper(cpath, exec_fd, cargv, cenv, fds, n, &p)
    finally:
        free(cargv)
        free(cenv)
    if rc < 0:
        raise errors.oserror(-rc, "spawn", path if path is not None else argv[0])
    return (p.pid, p.pidfd, p.out_fd, p.err_fd)


cdef void _proc(tuple proc, px_proc *p):
    p.pid, p.pidfd, p.out_fd, p.err_fd = proc


def wait(tuple proc, long long deadline_ns, int cancel_fd, cap_out, cap_err):
    """Wait for exit, deadline or cancel_fd; returns (rc, status tuple or None)."""
    cdef px_proc p
    cdef px_status st
    cdef px_capture *co = _cap(cap_out)
    cdef px_capture *ce = _cap(cap_err)
    cdef int rc
    _proc(proc, &p)
    with nogil:
        rc = px_wait(&p, deadline_ns, cancel_fd, co, ce, &st)
    return rc, (_status(&st) if rc == 0 else None)


def kill_tree(tuple proc, int cgroup_fd, long long grace_ns, long long kill_wait_ns, cap_out, cap_err):
    """TERM, grace, KILL the script's tree and reap it; returns (rc, status tuple or None)."""
    cdef px_proc p
    cdef px_status st
    cdef px_capture *co = _cap(cap_out)
    cdef px_capture *ce = _cap(cap_err)
    cdef int rc
    _proc(proc, &p)
    with nogil:
        rc = px_kill_tree(&p, cgroup_fd, grace_ns, kill_wait_ns, co, ce, &st)
    return rc, (_status(&st) if rc == 0 else None)


def watch_parent(int parent, int life_fd, int death_sig):
    """Watch this process's parent for its death: (0, fd to poll, or -1 where death_sig will come), or (-errno, -1)."""
    cdef int32_t fd = -1
    cdef int rc = px_watch_parent(parent, life_fd, death_sig, &fd)
    return rc, fd
