/* Wait for a spawned process while draining its output into bounded captures; reap it.
 * No polling: one ppoll over the exit fd, both pipes and a cancel fd, with the deadline as timeout.
 * And the one watch of a parent's death, for whoever must outlive or follow its parent. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3 /* waitid(P_PIDFD): kernel 5.4 */
#endif

static void cap_append(px_capture *c, const uint8_t *buf, size_t len)
{
    c->total += len;
    if (c->head_len < PX_CAP_HALF) {
        size_t k = PX_CAP_HALF - c->head_len;
        if (k > len)
            k = len;
        memcpy(c->head + c->head_len, buf, k);
        c->head_len += (uint32_t)k;
        buf += k;
        len -= k;
    }
    while (len > 0) {
        size_t k = PX_CAP_HALF - c->tail_pos;
        if (k > len)
            k = len;
        memcpy(c->tail + c->tail_pos, buf, k);
        c->tail_pos = (uint32_t)((c->tail_pos + k) % PX_CAP_HALF);
        if (c->tail_len + k > PX_CAP_HALF) {
            c->dropped += c->tail_len + k - PX_CAP_HALF;
            c->tail_len = PX_CAP_HALF;
        } else {
            c->tail_len += (uint32_t)k;
        }
        buf += k;
        len -= k;
    }
}

/* Read what fd has now, at most max_bytes.  Returns 1 at EOF, 0 otherwise. */
static int drain(int fd, px_capture *c, size_t max_bytes)
{
    uint8_t buf[16384];
    size_t got_total = 0;
    while (got_total < max_bytes) {
        ssize_t got = read(fd, buf, sizeof(buf));
        if (got > 0) {
            if (c)
                cap_append(c, buf, (size_t)got);
            got_total += (size_t)got;
            continue;
        }
        if (got == 0) {
            if (c)
                c->eof = 1;
            return 1;
        }
        if (errno == EINTR)
            continue;
        return errno == EAGAIN ? 0 : 1;
    }
    return 0;
}

/* Wait until the pidfd is readable (the process has exited), the deadline passes or cancel_fd
 * is readable, draining both pipes meanwhile.  Does not reap. */
int px_wait_exit(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
                     px_capture *err, int64_t *seen_ns)
{
    struct pollfd pf[4];
    int open_out = p->out_fd >= 0 && !(out && out->eof);
    int open_err = p->err_fd >= 0 && !(err && err->eof);
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (deadline_ns >= 0) {
            px_left_ts(deadline_ns, px_now_ns(), &ts);
            tsp = &ts;
        }
        pf[0].fd = p->pidfd;
        pf[0].events = POLLIN;
        pf[1].fd = open_out ? p->out_fd : -1; /* a negative fd is ignored by poll */
        pf[1].events = POLLIN;
        pf[2].fd = open_err ? p->err_fd : -1;
        pf[2].events = POLLIN;
        pf[3].fd = cancel_fd;
        pf[3].events = POLLIN;
        pf[0].revents = pf[1].revents = pf[2].revents = pf[3].revents = 0;
        int r = ppoll(pf, 4, tsp, NULL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (pf[1].revents && drain(p->out_fd, out, 1 << 20))
            open_out = 0;
        if (pf[2].revents && drain(p->err_fd, err, 1 << 20))
            open_err = 0;
        if (pf[0].revents) {
            *seen_ns = px_now_ns();
            /* What the script wrote before exiting is in the pipes now; take it, but
             * do not wait for EOF: a daemonized grandchild may hold them open. */
            if (open_out)
                drain(p->out_fd, out, 64u << 20);
            if (open_err)
                drain(p->err_fd, err, 64u << 20);
            return 0;
        }
        if (pf[3].revents)
            return -ECANCELED;
        if (r == 0 && deadline_ns >= 0 && px_now_ns() >= deadline_ns)
            return -ETIMEDOUT;
    }
}

int px_reap(const px_proc *p, px_status *st)
{
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    /* Without P_PIDFD (kernel < 5.4) the pid itself: it is ours and unreaped, so it cannot be
     * reused. */
    int by_pidfd = px_features_get()->waitid_pidfd;
    long r;
    do {
        r = syscall(SYS_waitid, by_pidfd ? P_PIDFD : P_PID, by_pidfd ? p->pidfd : p->pid, &si, WEXITED, NULL);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    st->code = si.si_code == CLD_EXITED ? si.si_status : -1;
    st->signal = si.si_code == CLD_EXITED ? 0 : si.si_status;
    return 0;
}

int px_wait(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
            px_capture *err, px_status *st)
{
    int64_t seen = 0;
    int rc = px_wait_exit(p, deadline_ns, cancel_fd, out, err, &seen);
    if (rc < 0)
        return rc;
    st->exit_seen_ns = seen;
    return px_reap(p, st);
}


int px_parent_death_signal(pid_t parent, int sig)
{
    if (prctl(PR_SET_PDEATHSIG, sig) < 0)
        return -errno;
    /* Armed after the parent may have died: then the signal never comes, and we are reparented. */
    return getppid() == parent ? 0 : -ESRCH;
}

int px_watch_parent(int32_t parent, int life_fd, int death_sig, int32_t *fd)
{
    *fd = -1;
    int w;
    if (px_features_get()->pidfd_open) { /* kernel 5.3 */
        w = (int)syscall(SYS_pidfd_open, parent, 0);
    } else if (life_fd >= 0) {
        /* Before 5.3: parent holds the only write end of its life pipe (close-on-exec), so the
         * read end, reopened through /proc, hangs up when it dies. */
        char path[64];
        snprintf(path, sizeof(path), "/proc/%d/fd/%d", (int)parent, life_fd);
        w = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    } else {
        return death_sig > 0 ? px_parent_death_signal(parent, death_sig) : -ENOSYS;
    }
    if (w < 0)
        return -errno;
    /* Opened after the parent may have died (and its pid been reused): then we are reparented. */
    if (getppid() != parent) {
        close(w);
        return -ESRCH;
    }
    *fd = w;
    return 0;
}
