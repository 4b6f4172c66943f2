# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython binding of the native core: argument conversion only, GIL released around
every call that can block.  The declarations are pyexec/_core.pxd, generated from the header;
structs come and go as their bytes.  Policy lives in pyexec/; errors are built in pyexec/errors."""
from libc.stdint cimport int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from pyexec._core cimport *
from pyexec import errors

NAME = "cython"


def layout():
    """Each struct's sizeof and its fields' offsetof, as the compiler laid them out (for the check at load)."""
    return px_layout()


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


def probe():
    """The px_features of the kernel features in use (1) or replaced by a fallback (0)."""
    cdef px_features f
    memset(&f, 0, sizeof(f))
    px_probe(&f)
    return (<char *>&f)[:sizeof(f)]


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
    """Spawn argv; returns its px_proc or raises OSError."""
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
    return (<char *>&p)[:sizeof(p)]


def spawn_helper(path, int exec_fd, list argv, list env, list cgroup_fds):
    """Spawn a helper into cgroup_fds; returns its px_proc or raises OSError."""
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
    return (<char *>&p)[:sizeof(p)]


cdef int _proc(bytes proc, px_proc *p) except -1:
    if len(proc) != sizeof(px_proc):
        raise ValueError(f"px_proc: {len(proc)} bytes, not {sizeof(px_proc)}")
    memcpy(p, <const char *>proc, sizeof(px_proc))
    return 0


def wait(bytes proc, long long deadline_ns, int cancel_fd, cap_out, cap_err):
    """Wait for exit, deadline or cancel_fd; returns (rc, px_status: zeros unless rc is 0)."""
    cdef px_proc p
    cdef px_status st
    cdef px_capture *co = _cap(cap_out)
    cdef px_capture *ce = _cap(cap_err)
    cdef int rc
    _proc(proc, &p)
    memset(&st, 0, sizeof(st))
    with nogil:
        rc = px_wait(&p, deadline_ns, cancel_fd, co, ce, &st)
    return rc, (<char *>&st)[:sizeof(st)]


def kill_tree(bytes proc, int cgroup_fd, long long grace_ns, long long kill_wait_ns, cap_out, cap_err):
    """TERM, grace, KILL the script's tree and reap it; returns (rc, px_status: zeros unless rc is 0)."""
    cdef px_proc p
    cdef px_status st
    cdef px_capture *co = _cap(cap_out)
    cdef px_capture *ce = _cap(cap_err)
    cdef int rc
    _proc(proc, &p)
    memset(&st, 0, sizeof(st))
    with nogil:
        rc = px_kill_tree(&p, cgroup_fd, grace_ns, kill_wait_ns, co, ce, &st)
    return rc, (<char *>&st)[:sizeof(st)]


def watch_parent(int parent, int life_fd, int death_sig):
    """Watch this process's parent for its death: (0, fd to poll, or -1 where death_sig will come), or (-errno, -1)."""
    cdef int32_t fd = -1
    cdef int rc = px_watch_parent(parent, life_fd, death_sig, &fd)
    return rc, fd
