/* pyexec-guardian: thaws what the controller froze if the controller dies or overruns.
 *
 * Started by the controller before its first FIFREEZE, with the freeze set's shared page
 * (a memfd) as fd 3 and the controller's pid as argv[1].  It opens its own fd on every
 * mount through /proc/<pid>/fd, says it is ready, then sleeps in ppoll on the controller's
 * pidfd with the page's deadline as timeout.  No Python, no allocation after start.
 * argv[2], if given, is the run's journal: once the guardian has thawed, it removes it, so that
 * a journal left behind always means that nobody thawed (what `pyexec recover` looks for). */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE_FD 3
#define G_READY 1
#define G_FIRED_DEADLINE 2
#define G_FIRED_CONTROLLER_DIED 3
#define G_DONE 4

#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_ACQUIRE)
#define STORE(field, v) __atomic_store_n(&(field), (v), __ATOMIC_RELEASE)

static int thaw_ours(px_set *s, int controller_dead)
{
    int in_flight = 0;
    for (int32_t i = s->n - 1; i >= 0; i--) {
        px_mount *m = &s->m[i];
        int32_t st = LOAD(m->state);
        if (st != PX_M_FROZEN && st != PX_M_FREEZING)
            continue;
        if (m->guardian_fd < 0)
            continue;
        int r = ioctl(m->guardian_fd, FITHAW, 0);
        /* A FREEZING mount of a live controller may still have its FIFREEZE in flight:
         * EINVAL means it has not frozen yet, so it must be tried again. */
        if (st == PX_M_FREEZING && !controller_dead && r < 0 && errno == EINVAL) {
            in_flight = 1;
            continue;
        }
        if (r == 0 || errno == EINVAL)
            STORE(m->state, PX_M_THAWED);
    }
    px_rcu_restore(s);
    return in_flight;
}

int main(int argc, char **argv)
{
    if (argc != 2 && argc != 3)
        return 2;
    pid_t ctl = (pid_t)atoi(argv[1]);
    px_set *s = mmap(NULL, sizeof(px_set), PROT_READ | PROT_WRITE, MAP_SHARED, PAGE_FD, 0);
    if (s == MAP_FAILED || s->magic != PX_SET_MAGIC)
        return 2;
    int pidfd = (int)syscall(SYS_pidfd_open, ctl, 0);
    int dead = pidfd < 0 || getppid() != ctl;
    char path[64];
    for (int32_t i = 0; i < s->n; i++) {
        snprintf(path, sizeof(path), "/proc/%d/fd/%d", (int)ctl, (int)s->m[i].fd);
        s->m[i].guardian_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    s->guardian_pid = getpid();
    STORE(s->guardian_state, G_READY);
    /* The controller waits for this byte on our stdout pipe: an event, not a poll of the page. */
    ssize_t w = write(STDOUT_FILENO, "R", 1);
    (void)w;
    for (;;) {
        int64_t deadline = LOAD(s->deadline_ns);
        if (!dead) {
            struct timespec ts, *tsp = NULL;
            if (deadline > 0) {
                px_left_ts(deadline, px_now_ns(), &ts);
                tsp = &ts;
            }
            struct pollfd pf = {pidfd, POLLIN, 0};
            int r = ppoll(&pf, 1, tsp, NULL);
            if (r < 0 && errno == EINTR)
                continue;
            if (r > 0)
                dead = 1;
            else if (LOAD(s->phase) == PX_PHASE_DONE)
                break;
            else if (deadline <= 0 || px_now_ns() < LOAD(s->deadline_ns))
                continue; /* the controller moved the deadline */
        }
        if (LOAD(s->phase) == PX_PHASE_DONE || LOAD(s->phase) == PX_PHASE_IDLE) {
            if (dead) {
                /* Between windows: nothing is frozen, but a crash may have left the
                 * rcu setting behind. */
                px_rcu_restore(s);
                break;
            }
            continue;
        }
        STORE(s->guardian_state, dead ? G_FIRED_CONTROLLER_DIED : G_FIRED_DEADLINE);
        while (thaw_ours(s, dead)) {
            /* Rare: wait for the controller's stuck FIFREEZE to land, then thaw it. */
            struct pollfd pf = {pidfd, POLLIN, 0};
            struct timespec ts = {0, 1000000};
            if (ppoll(&pf, 1, &ts, NULL) > 0)
                dead = 1;
        }
        if (argc == 3)
            unlink(argv[2]);
        break;
    }
    return 0;
}
