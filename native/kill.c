/* Kill a script's whole process tree: TERM, a grace period, KILL, reap.  The tree is its cgroup
 * where there is one (cgroup.kill, kernel 5.14; else the cgroup frozen (5.2), each pid killed,
 * thawed), plus its process group; without a cgroup only the group (what escapes then: README). */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void signal_tree(const px_proc *p, int sig)
{
    /* The script is its session's and group's leader (setsid): pgid == pid.  It is unreaped
     * until we reap it, so neither the pid nor the group can have been reused. */
    if (kill(-p->pid, sig) < 0)
        kill(p->pid, sig);
}

/* Read cgroup.events until `want` (e.g. "populated 0") shows or the deadline passes.  The kernel
 * signals each change of that file with POLLPRI (cgroup-v2.rst): an event, not a poll loop. */
static int cgroup_events_wait(int cgroup_fd, const char *want, int64_t deadline_ns)
{
    char buf[256];
    int found = 0;
    int fd = openat(cgroup_fd, "cgroup.events", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    for (;;) {
        ssize_t got = pread(fd, buf, sizeof(buf) - 1, 0);
        if (got <= 0)
            break;
        buf[got] = 0;
        if (strstr(buf, want)) {
            found = 1;
            break;
        }
        int64_t now = px_now_ns();
        if (now >= deadline_ns)
            break;
        struct timespec ts;
        px_left_ts(deadline_ns, now, &ts);
        struct pollfd pf = {fd, POLLPRI, 0};
        if (ppoll(&pf, 1, &ts, NULL) < 0 && errno != EINTR)
            break;
    }
    close(fd);
    return found ? 0 : -ETIMEDOUT;
}

static int write_file(int dir_fd, const char *name, const char *val)
{
    int fd = openat(dir_fd, name, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = write(fd, val, strlen(val)) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

/* SIGKILL every pid listed in the cgroup's cgroup.procs; the count killed, or -errno. */
static int kill_listed(int cgroup_fd)
{
    char buf[4096];
    int fd = openat(cgroup_fd, "cgroup.procs", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int n = 0;
    ssize_t got;
    size_t keep = 0;
    while ((got = read(fd, buf + keep, sizeof(buf) - 1 - keep)) > 0) {
        size_t len = keep + (size_t)got;
        buf[len] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = 0;
            long pid = strtol(line, NULL, 10);
            if (pid > 0 && kill((pid_t)pid, SIGKILL) == 0)
                n++;
            line = nl + 1;
        }
        keep = len - (size_t)(line - buf);
        memmove(buf, line, keep);
    }
    close(fd);
    return n;
}

/* SIGKILL everything in the cgroup: cgroup.kill (5.14) in one step; else freeze it (5.2) so that
 * nothing forks while its pids are listed and killed, then thaw it; else one listing pass. */
static void cgroup_kill_all(int cgroup_fd, int64_t deadline_ns)
{
    const px_features *f = px_features_get();
    if (f->cgroup_kill && write_file(cgroup_fd, "cgroup.kill", "1") == 0)
        return;
    if (f->cgroup_freeze && write_file(cgroup_fd, "cgroup.freeze", "1") == 0) {
        cgroup_events_wait(cgroup_fd, "frozen 1", deadline_ns);
        kill_listed(cgroup_fd);
        write_file(cgroup_fd, "cgroup.freeze", "0"); /* SIGKILL takes effect on the thaw */
        return;
    }
    kill_listed(cgroup_fd);
}

int px_cgroup_kill(int cgroup_fd, int64_t deadline_ns)
{
    cgroup_kill_all(cgroup_fd, deadline_ns);
    cgroup_events_wait(cgroup_fd, "populated 0", deadline_ns);
    return 0;
}

int px_kill_tree(const px_proc *p, int cgroup_fd, int64_t grace_ns, int64_t kill_wait_ns,
                 px_capture *out, px_capture *err, px_status *st)
{
    int64_t seen = 0;
    signal_tree(p, SIGTERM);
    int rc = px_wait_exit(p, px_now_ns() + grace_ns, -1, out, err, &seen);
    /* KILL the tree even if the leader went on TERM, and even if that wait failed: descendants
     * that ignore TERM must not outlive it.  The leader is unreaped, so its pgid is still ours. */
    signal_tree(p, SIGKILL);
    if (cgroup_fd >= 0)
        cgroup_kill_all(cgroup_fd, px_now_ns() + kill_wait_ns);
    if (rc < 0) {
        /* A process blocked on a frozen filesystem ignores SIGKILL until the thaw:
         * bounded, and the caller thaws before it kills inside a freeze window. */
        rc = px_wait_exit(p, px_now_ns() + kill_wait_ns, -1, out, err, &seen);
        if (rc < 0)
            return rc;
    }
    st->exit_seen_ns = seen;
    rc = px_reap(p, st);
    if (cgroup_fd >= 0) /* a setsid'd grandchild may still be dying */
        cgroup_events_wait(cgroup_fd, "populated 0", px_now_ns() + kill_wait_ns);
    return rc;
}
