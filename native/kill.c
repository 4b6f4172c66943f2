/* Kill a script's whole process tree: TERM, a grace period, KILL, reap.  The tree is its cgroup
 * where there is one, plus its process group; without a cgroup only the group (what escapes then:
 * README).  A cgroup v2 leaf: cgroup.kill (5.14), else frozen (cgroup.freeze, 5.2), each pid killed,
 * thawed; its emptiness is an event (cgroup.events).  A cgroup v1 freezer leaf (a v1-only machine):
 * frozen (freezer.state), each pid killed, thawed, and each killed pid's exit awaited on its pidfd,
 * pass after pass until the leaf is empty; v1 has no emptiness event. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef CGROUP_SUPER_MAGIC
#define CGROUP_SUPER_MAGIC 0x27e0eb
#endif
#define KILL_PASSES 16
#define MAX_LISTED 4096

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
    int rc = -ETIMEDOUT;
    int fd = openat(cgroup_fd, "cgroup.events", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    for (;;) {
        ssize_t got = pread(fd, buf, sizeof(buf) - 1, 0);
        if (got <= 0) {
            rc = got < 0 ? -errno : -EIO;
            break;
        }
        buf[got] = 0;
        if (strstr(buf, want)) {
            rc = 0;
            break;
        }
        int64_t now = px_now_ns();
        if (now >= deadline_ns)
            break;
        struct timespec ts;
        px_left_ts(deadline_ns, now, &ts);
        struct pollfd pf = {fd, POLLPRI, 0};
        if (ppoll(&pf, 1, &ts, NULL) < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
    }
    close(fd);
    return rc;
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

/* Send sig to every pid listed in the cgroup's cgroup.procs (0: only check that it lives), keeping
 * up to max of them in pids (if given); the count signalled, or -errno. */
static int signal_listed(int cgroup_fd, int sig, pid_t *pids, int max)
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
            if (pid > 0 && kill((pid_t)pid, sig) == 0) {
                if (pids && n < max)
                    pids[n] = (pid_t)pid;
                n++;
            }
            line = nl + 1;
        }
        keep = len - (size_t)(line - buf);
        memmove(buf, line, keep);
    }
    close(fd);
    return n;
}

int px_cgroup_is_v1(int cgroup_fd)
{
    struct statfs sf;
    return fstatfs(cgroup_fd, &sf) == 0 && sf.f_type == CGROUP_SUPER_MAGIC;
}

/* Wait until every pid of pids has exited, each on its own pidfd (kernel 5.3), or the deadline. */
static void wait_pids_gone(const pid_t *pids, int n, int64_t deadline_ns)
{
    for (int i = 0; i < n; i++) {
        int fd = (int)syscall(SYS_pidfd_open, pids[i], 0);
        if (fd < 0)
            continue; /* gone already (ESRCH), or no pidfd on this kernel */
        struct pollfd pf = {fd, POLLIN, 0};
        for (;;) {
            struct timespec ts;
            px_left_ts(deadline_ns, px_now_ns(), &ts);
            int r = ppoll(&pf, 1, &ts, NULL);
            if (!(r < 0 && errno == EINTR))
                break;
        }
        close(fd);
    }
}

/* A cgroup v1 freezer leaf: freeze it so nothing forks while its pids are listed and killed, thaw
 * (the kills land), await those exits; again until a pass finds nobody.  0 once empty. */
static int v1_kill_all(int cgroup_fd, int64_t deadline_ns)
{
    pid_t pids[MAX_LISTED];
    for (int pass = 0; pass < KILL_PASSES && px_now_ns() < deadline_ns; pass++) {
        int frozen = write_file(cgroup_fd, "freezer.state", "FROZEN") == 0;
        int n = signal_listed(cgroup_fd, SIGKILL, pids, MAX_LISTED);
        if (frozen)
            write_file(cgroup_fd, "freezer.state", "THAWED");
        if (n <= 0)
            return n;
        if (!px_features_get()->pidfd_open)
            return -ENOSYS; /* no way to await their exits without a timed poll: one pass only */
        wait_pids_gone(pids, n < MAX_LISTED ? n : MAX_LISTED, deadline_ns);
    }
    return -ETIMEDOUT;
}

/* SIGKILL everything in the cgroup: cgroup.kill (5.14) in one step; else freeze it (5.2) so that
 * nothing forks while its pids are listed and killed, then thaw it; else one listing pass.  Each
 * step that fails falls back to the next.  On v2, 0 once the kill is sent (the cgroup may not be
 * empty yet) or the listing's -errno; on v1, v1_kill_all's answer (0: empty). */
static int cgroup_kill_all(int cgroup_fd, int64_t deadline_ns)
{
    const px_features *f = px_features_get();
    if (px_cgroup_is_v1(cgroup_fd))
        return v1_kill_all(cgroup_fd, deadline_ns);
    if (f->cgroup_kill && write_file(cgroup_fd, "cgroup.kill", "1") == 0)
        return 0;
    int n;
    if (f->cgroup_freeze && write_file(cgroup_fd, "cgroup.freeze", "1") == 0) {
        cgroup_events_wait(cgroup_fd, "frozen 1", deadline_ns);
        n = signal_listed(cgroup_fd, SIGKILL, NULL, 0);
        write_file(cgroup_fd, "cgroup.freeze", "0"); /* SIGKILL takes effect on the thaw */
    } else {
        n = signal_listed(cgroup_fd, SIGKILL, NULL, 0);
    }
    return n < 0 ? n : 0;
}

/* Wait until the cgroup is empty (0, else -ETIMEDOUT or -errno): an event on v2; on v1 the kill
 * passes have waited already (and said so). */
static int cgroup_wait_empty(int cgroup_fd, int64_t deadline_ns)
{
    if (px_cgroup_is_v1(cgroup_fd))
        return 0;
    return cgroup_events_wait(cgroup_fd, "populated 0", deadline_ns);
}

int px_cgroup_kill(int cgroup_fd, int64_t deadline_ns)
{
    int rc = cgroup_kill_all(cgroup_fd, deadline_ns);
    int empty = cgroup_wait_empty(cgroup_fd, deadline_ns);
    return rc < 0 ? rc : empty;
}

int px_cgroup_wait_empty(int cgroup_fd, int64_t deadline_ns)
{
    if (!px_cgroup_is_v1(cgroup_fd))
        return cgroup_events_wait(cgroup_fd, "populated 0", deadline_ns);
    /* v1 has no emptiness event: await the exit of each pid it lists, on its pidfd.  One pass:
     * nothing joins a cgroup the warden waits on (its controller is gone). */
    pid_t pids[MAX_LISTED];
    int n = signal_listed(cgroup_fd, 0, pids, MAX_LISTED);
    if (n <= 0)
        return n;
    if (!px_features_get()->pidfd_open)
        return -ENOSYS;
    wait_pids_gone(pids, n < MAX_LISTED ? n : MAX_LISTED, deadline_ns);
    return signal_listed(cgroup_fd, 0, NULL, 0) == 0 ? 0 : -ETIMEDOUT;
}

void px_helper_leave(const char *ctl, char *const parents[], int n)
{
    char guard[64];
    snprintf(guard, sizeof(guard), "%s/" PX_GUARD_LEAF, ctl);
    for (int i = 0; i < n; i++) {
        int parent = open(parents[i], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (parent < 0)
            continue;
        /* If the move fails, "guard" stays populated: the next warden's sweep removes it. */
        write_file(parent, "cgroup.procs", "0");
        unlinkat(parent, guard, AT_REMOVEDIR);
        unlinkat(parent, ctl, AT_REMOVEDIR); /* fails while a script, a daemon or a helper is left */
        close(parent);
    }
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
    if (cgroup_fd >= 0) /* what it cannot reach, the group's SIGKILL above may have */
        (void)cgroup_kill_all(cgroup_fd, px_now_ns() + kill_wait_ns);
    if (rc < 0) {
        /* A process blocked on a frozen filesystem ignores SIGKILL until the thaw:
         * bounded, and the caller thaws before it kills inside a freeze window. */
        rc = px_wait_exit(p, px_now_ns() + kill_wait_ns, -1, out, err, &seen);
        if (rc < 0)
            return rc;
    }
    st->exit_seen_ns = seen;
    rc = px_reap(p, st);
    if (cgroup_fd >= 0) /* a setsid'd grandchild may still be dying; the leader's status stands */
        (void)cgroup_wait_empty(cgroup_fd, px_now_ns() + kill_wait_ns);
    return rc;
}
