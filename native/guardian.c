/* pyexec-guardian: thaws what the controller froze if the controller dies or overruns.
 *
 * Started by the controller before its first FIFREEZE, with the freeze set's shared page
 * (the run's journal file on tmpfs) as fd 3, the controller's pid as argv[1] and its life pipe
 * (read end, for kernels without pidfd_open) as argv[2].  It opens its
 * own fd on every mount through /proc/<pid>/fd, says it is ready, then sleeps in ppoll on the
 * controller's pidfd with the page's deadline as timeout.  No Python, no allocation after start.
 *
 * It never blocks behind an ioctl that cannot return: it thaws only mounts marked frozen (last
 * first) while the controller lives.  A mount marked freezing has a FIFREEZE in flight in the
 * controller, and a FITHAW issued now would wait for it (both take the superblock's s_umount)
 * while that FIFREEZE may itself wait for a filesystem frozen behind it (a loop image on a frozen
 * mount).  That mount is the controller's to undo: px_freeze thaws it itself when its FIFREEZE
 * returns and sees the guardian fired.  If the controller dies instead (a process dies only once
 * its ioctl has returned), nothing is in flight any more and the guardian thaws it.
 * argv[3], if given, is the run's journal: once the guardian has thawed everything, it removes it,
 * so that a journal left behind always means that nobody thawed (what `pyexec recover` looks for).
 * It runs in pyexec's own cgroups (argv[4...]: <mount>/pyexec of each hierarchy; see warden.c), out of
 * reach of a kill or a freeze of the caller's cgroup. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE_FD 3

#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_ACQUIRE)

/* Sleep until the controller dies or the deadline passes: 1 if it died, 0 at the deadline.
 * deadline_ns <= 0 sleeps until it dies. */
static int wait_controller(int pidfd, int64_t deadline_ns)
{
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (deadline_ns > 0) {
            px_left_ts(deadline_ns, px_now_ns(), &ts);
            tsp = &ts;
        }
        struct pollfd pf = {pidfd, POLLIN, 0}; /* a hung-up life pipe reports POLLHUP */
        int r = ppoll(&pf, 1, tsp, NULL);
        if (r > 0)
            return 1;
        if (r == 0)
            return 0;
        if (errno != EINTR)
            return 1; /* cannot watch it any more: act as if it died */
    }
}

static int any_ours(px_set *s)
{
    for (int32_t i = 0; i < s->n; i++) {
        int32_t st = LOAD(s->m[i].state);
        if (st == PX_M_FROZEN || st == PX_M_FREEZING)
            return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    pid_t ctl = (pid_t)atoi(argv[1]);
    px_set *s = mmap(NULL, sizeof(px_set), PROT_READ | PROT_WRITE, MAP_SHARED, PAGE_FD, 0);
    if (s == MAP_FAILED || s->magic != PX_SET_MAGIC || s->version != PX_SET_VERSION)
        return 2;
    int32_t pidfd;
    int dead = px_watch_parent(ctl, atoi(argv[2]), 0, &pidfd) < 0;
    char path[64];
    for (int32_t i = 0; i < s->n; i++) {
        snprintf(path, sizeof(path), "/proc/%d/fd/%d", (int)ctl, (int)s->m[i].fd);
        s->m[i].guardian_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    s->guardian_pid = getpid();
    __atomic_store_n(&s->guardian_state, PX_G_READY, __ATOMIC_SEQ_CST);
    /* The controller waits for this byte on our stdout pipe: an event, not a poll of the page. */
    ssize_t w = write(STDOUT_FILENO, "R", 1);
    (void)w;
    while (!dead) {
        int64_t deadline = LOAD(s->deadline_ns);
        dead = wait_controller(pidfd, deadline);
        if (dead)
            break;
        if (px_now_ns() < LOAD(s->deadline_ns))
            continue; /* the controller moved the deadline */
        int32_t phase = LOAD(s->phase);
        if (phase == PX_PHASE_DONE) {
            /* The window closed in time; the controller is about to stop us. */
            __atomic_store_n(&s->deadline_ns, 0, __ATOMIC_RELEASE);
            continue;
        }
        /* Fire: publish it before reading the mounts' states (px_freeze does the mirror image). */
        __atomic_store_n(&s->guardian_state, PX_G_FIRED_DEADLINE, __ATOMIC_SEQ_CST);
        px_thaw(s, PX_THAW_GUARDIAN_FDS);
        px_rcu_restore(s);
        /* What is still marked ours has its FIFREEZE in flight in the live controller: the
         * controller undoes it, unless it dies first.  Either way stay until it stops us or dies. */
        dead = wait_controller(pidfd, 0);
    }
    if (dead) {
        int32_t phase = LOAD(s->phase);
        if ((LOAD(s->flags) & PX_FREEZE_HOLD) && phase != PX_PHASE_IDLE && phase != PX_PHASE_DONE) {
            /* Only the deadline ends this window now: sleep to it (no ioctl of the dead controller
             * is in flight any more, so the thaw below is ours whenever it comes). */
            for (int64_t d = LOAD(s->deadline_ns); d > 0 && px_now_ns() < d; d = LOAD(s->deadline_ns)) {
                struct timespec ts;
                px_left_ts(d, px_now_ns(), &ts);
                ppoll(NULL, 0, &ts, NULL);
            }
        }
        if (phase != PX_PHASE_IDLE && phase != PX_PHASE_DONE) {
            int32_t expected = PX_G_READY;
            __atomic_compare_exchange_n(&s->guardian_state, &expected, PX_G_FIRED_DIED, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        }
        /* The controller is gone, so no ioctl of its is in flight: every mount marked
         * freezing or frozen is ours to thaw (the one ambiguous instant: killed inside a
         * FIFREEZE that answered EBUSY, see docs). */
        px_thaw(s, PX_THAW_GUARDIAN_FDS | PX_THAW_IN_FLIGHT);
        px_rcu_restore(s);
    }
    if (argc >= 4 && !any_ours(s))
        unlink(argv[3]);
    /* Nothing left to guard: leave pyexec's cgroup "guard" (argv[4...]: its hierarchies' pyexec
     * directories) and remove it if the warden is done.  Only once the controller has exited (we
     * have been reparented), never while a controller that we could not watch still uses it. */
    if (getppid() != ctl)
        px_helper_leave(argv[1], argv + 4, argc > 4 ? argc - 4 : 0);
    return 0;
}
