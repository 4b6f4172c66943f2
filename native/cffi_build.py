"""cffi (API mode, out-of-line) build of the native core: pyexec._pxcffi.

The C sources are linked in from the `pxcore` static library that setup.py's
build_clib makes, so both bindings run the very same object code."""
import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef("""
    typedef struct { ...; } px_set;
    typedef struct { ...; } px_capture;
    typedef struct { int32_t pid; int32_t pidfd; int32_t out_fd; int32_t err_fd; } px_proc;
    typedef struct {
        int32_t code; int32_t signal; int32_t core;
        int64_t utime_ns; int64_t stime_ns; int64_t maxrss_kb; int64_t exit_seen_ns;
        ...;
    } px_status;
    typedef struct {
        int32_t pidfd_open; int32_t waitid_pidfd; int32_t clone3_cgroup; int32_t close_range_cloexec;
        int32_t cgroup_kill; int32_t cgroup_freeze;
    } px_features;
    int px_probe(px_features *f);
    #define PX_MAX_MOUNTS ...
    int64_t px_now_ns(void);
    int px_set_init(px_set *s, const int32_t *fds, int32_t n);
    int px_freeze(px_set *s, int32_t flags);
    int px_thaw(px_set *s, int32_t flags);
    int px_rcu_restore(px_set *s);
    int px_spawn(const char *path, int exec_fd, char *const argv[], char *const envp[],
                 int cgroup_fd, px_proc *p);
    int px_wait(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
                px_capture *err, px_status *st);
    int px_kill_tree(const px_proc *p, int cgroup_fd, int64_t grace_ns, int64_t kill_wait_ns,
                     px_capture *out, px_capture *err, px_status *st);
""")
# cffi releases the GIL around every call into lib by default.
ffibuilder.set_source(
    "pyexec._pxcffi", '#include "pyexec_core.h"', include_dirs=[str(HERE)],
    depends=[str(HERE / f) for f in ("freeze.c", "spawn.c", "wait.c", "kill.c", "probe.c", "pyexec_core.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
