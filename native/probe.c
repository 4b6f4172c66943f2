/* Kernel features, probed once per process and cached; each one has an event-driven fallback.
 *
 * A probe calls the syscall in a way that cannot do anything (a bad fd, an empty range) and reads
 * the answer: ENOSYS (or EINVAL/E2BIG for a flag or a struct size the kernel does not know) means
 * absent.  PYEXEC_DISABLE (a comma-separated list of the names below) makes a probe report a
 * feature absent: the switch for cgroup files, which a seccomp filter cannot hide, and for tests. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

static px_features cached;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int disabled(const char *name)
{
    const char *list = getenv("PYEXEC_DISABLE");
    size_t n = strlen(name);
    while (list && *list) {
        const char *end = strchr(list, ',');
        size_t len = end ? (size_t)(end - list) : strlen(list);
        if (len == n && strncmp(list, name, n) == 0)
            return 1;
        list = end ? end + 1 : NULL;
    }
    return 0;
}

static void probe(void)
{
    px_features *f = &cached;
    /* pidfd_open: kernel 5.3. */
    int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    f->pidfd_open = fd >= 0 && !disabled("pidfd_open");
    /* waitid(P_PIDFD): kernel 5.4; before, the idtype itself is EINVAL.  Our own pidfd is no
     * child of ours: ECHILD where it is known. */
    siginfo_t si;
    long r = -1;
    if (fd >= 0) {
        r = syscall(SYS_waitid, P_PIDFD, fd, &si, WEXITED | WNOHANG, NULL);
        close(fd);
    }
    f->waitid_pidfd = r < 0 && errno == ECHILD && f->pidfd_open && !disabled("waitid_pidfd");
    /* clone3 with CLONE_INTO_CGROUP: kernel 5.7 (clone3 5.3).  An fd that is no cgroup makes it
     * EBADF before any child exists; an older kernel says ENOSYS, or E2BIG for the longer struct. */
    struct clone_args ca;
    memset(&ca, 0, sizeof(ca));
    int not_cgroup = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ca.flags = CLONE_INTO_CGROUP;
    ca.cgroup = (uint64_t)not_cgroup;
    ca.exit_signal = SIGCHLD;
    r = not_cgroup >= 0 ? syscall(SYS_clone3, &ca, sizeof(ca)) : -1;
    int e = errno;
    if (r == 0) /* cannot happen with that fd; if it does, be the child no longer */
        _exit(127);
    if (r > 0)
        waitpid((pid_t)r, NULL, 0);
    if (not_cgroup >= 0)
        close(not_cgroup);
    f->clone3_cgroup = r < 0 && e == EBADF && !disabled("clone3_cgroup");
    /* close_range with CLOSE_RANGE_CLOEXEC: kernel 5.11 (close_range 5.9); an empty range. */
    r = syscall(SYS_close_range, ~0U - 1, ~0U - 1, CLOSE_RANGE_CLOEXEC);
    f->close_range_cloexec = r == 0 && !disabled("close_range");
    /* Files of cgroup v2: cgroup.freeze 5.2, cgroup.kill 5.14.  The root cgroup has neither, so
     * the probe looks at our own cgroup's parent directory entries through the first leaf made;
     * the kill path checks for the file itself (px_kill_tree) and this only records the switch. */
    f->cgroup_kill = !disabled("cgroup_kill");
    f->cgroup_freeze = !disabled("cgroup_freeze");
}

const px_features *px_features_get(void)
{
    pthread_once(&once, probe);
    return &cached;
}

int px_probe(px_features *out)
{
    *out = *px_features_get();
    return 0;
}
