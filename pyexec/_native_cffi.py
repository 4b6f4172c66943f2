"""cffi binding of the native core, with the same functions as the Cython module
`pyexec._native`: the fallback where that module is absent, and a cross-check."""
from pyexec import errors
from pyexec._pxcffi import ffi, lib

NAME = "cffi"
SET_SIZE = ffi.sizeof("px_set")
CAPTURE_SIZE = ffi.sizeof("px_capture")
MAX_MOUNTS = lib.PX_MAX_MOUNTS


def offsets(struct_name: str, fields) -> list[int]:
    """offsetof each field of a C struct, as the compiler laid it out (for the layout check)."""
    return [ffi.offsetof(struct_name, f) for f in fields]


def _ptr(ctype, buf, size):
    if buf is None:
        return ffi.NULL, None
    if len(buf) < size:
        raise ValueError(f"{ctype} buffer too small")
    keep = ffi.from_buffer(buf, require_writable=True)
    return ffi.cast(ctype, keep), keep


def _status(st):
    return (st.code, st.signal, st.core, st.utime_ns, st.stime_ns, st.maxrss_kb, st.exit_seen_ns)


def probe():
    """The kernel features in use (1) or replaced by a fallback (0), in px_features order."""
    f = ffi.new("px_features *")
    lib.px_probe(f)
    return (f.pidfd_open, f.waitid_pidfd, f.clone3_cgroup, f.close_range_cloexec, f.cgroup_kill,
            f.cgroup_freeze)


def now_ns():
    """CLOCK_MONOTONIC in ns, as the core stamps it."""
    return lib.px_now_ns()


def set_init(buf, fds):
    """Load fds into the freeze set in buf; returns 0 or -errno."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_set_init(s, ffi.new("int32_t[]", list(fds)), len(fds))


def freeze(buf, flags):
    """FIFREEZE the set in order; returns 0 or -errno of the first failure."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_freeze(s, flags)


def thaw(buf, flags):
    """FITHAW what the set says is ours, in reverse; returns 0 or the first -errno."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_thaw(s, flags)


def rcu_restore(buf):
    """Put rcu_expedited back if the set says it is still ours to restore."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_rcu_restore(s)


def _strv(items):
    keep = [ffi.new("char[]", item) for item in items]
    return ffi.new("char *[]", keep + [ffi.NULL]), keep


def spawn(path, exec_fd, argv, env, cgroup_fd=-1):
    """Spawn argv; returns (pid, pidfd, out_fd, err_fd) or raises OSError."""
    p = ffi.new("px_proc *")
    cargv, _ka = _strv(argv)
    cenv, _ke = _strv(env)
    rc = lib.px_spawn(path if path is not None else ffi.NULL, exec_fd, cargv, cenv, cgroup_fd, p)
    if rc < 0:
        raise errors.oserror(-rc, "spawn", path if path is not None else argv[0])
    return (p.pid, p.pidfd, p.out_fd, p.err_fd)


def _proc(proc):
    p = ffi.new("px_proc *")
    p.pid, p.pidfd, p.out_fd, p.err_fd = proc
    return p


def wait(proc, deadline_ns, cancel_fd, cap_out, cap_err):
    """Wait for exit, deadline or cancel_fd; returns (rc, status tuple or None)."""
    st = ffi.new("px_status *")
    co, _k1 = _ptr("px_capture *", cap_out, CAPTURE_SIZE)
    ce, _k2 = _ptr("px_capture *", cap_err, CAPTURE_SIZE)
    rc = lib.px_wait(_proc(proc), deadline_ns, cancel_fd, co, ce, st)
    return rc, (_status(st) if rc == 0 else None)


def kill_tree(proc, cgroup_fd, grace_ns, kill_wait_ns, cap_out, cap_err):
    """TERM, grace, KILL the script's tree and reap it; returns (rc, status tuple or None)."""
    st = ffi.new("px_status *")
    co, _k1 = _ptr("px_capture *", cap_out, CAPTURE_SIZE)
    ce, _k2 = _ptr("px_capture *", cap_err, CAPTURE_SIZE)
    rc = lib.px_kill_tree(_proc(proc), cgroup_fd, grace_ns, kill_wait_ns, co, ce, st)
    return rc, (_status(st) if rc == 0 else None)
