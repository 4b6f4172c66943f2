/* Freeze and thaw of an ordered set of mount fds.  Between the first FIFREEZE and the
 * last FITHAW nothing here allocates, logs or calls back: only ioctls, clock reads
 * (vDSO) and stores into the caller's (possibly shared) px_set. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define RCU_EXPEDITED_PATH "/sys/kernel/rcu_expedited"

/* The guardian reads these fields from another process: publish with release order. */
#define STORE(field, v) __atomic_store_n(&(field), (v), __ATOMIC_RELEASE)
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_ACQUIRE)

int64_t px_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int px_set_init(px_set *s, const int32_t *fds, int32_t n)
{
    if (n < 0 || n > PX_MAX_MOUNTS)
        return -E2BIG;
    memset(s, 0, sizeof(*s));
    s->magic = PX_SET_MAGIC;
    s->version = PX_SET_VERSION;
    s->n = n;
    s->failed_index = -1;
    s->rcu_prev = -1;
    for (int32_t i = 0; i < n; i++) {
        s->m[i].fd = fds[i];
        s->m[i].guardian_fd = -1;
    }
    return 0;
}

/* Read the current rcu_expedited value and set it to 1.  Returns the open fd or -1. */
static int rcu_expedite(px_set *s)
{
    char c = 0;
    int fd = open(RCU_EXPEDITED_PATH, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        STORE(s->rcu_state, PX_RCU_SKIPPED);
        return -1;
    }
    if (pread(fd, &c, 1, 0) != 1 || (c != '0' && c != '1')) {
        close(fd);
        STORE(s->rcu_state, PX_RCU_SKIPPED);
        return -1;
    }
    if (c == '1') {
        close(fd);
        STORE(s->rcu_state, PX_RCU_ALREADY);
        return -1;
    }
    /* rcu_prev is published before the state that makes it meaningful, so a
     * guardian that sees PX_RCU_SET always knows what to put back. */
    STORE(s->rcu_prev, c - '0');
    STORE(s->rcu_state, PX_RCU_SET);
    if (pwrite(fd, "1", 1, 0) != 1) {
        STORE(s->rcu_state, PX_RCU_SKIPPED);
        close(fd);
        return -1;
    }
    return fd;
}

static void rcu_restore_fd(px_set *s, int fd)
{
    char c = (char)('0' + LOAD(s->rcu_prev));
    if (pwrite(fd, &c, 1, 0) == 1)
        STORE(s->rcu_state, PX_RCU_RESTORED);
    close(fd);
}

int px_rcu_restore(px_set *s)
{
    int rc = 0;
    if (LOAD(s->rcu_state) != PX_RCU_SET)
        return 0;
    int fd = open(RCU_EXPEDITED_PATH, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    char c = (char)('0' + LOAD(s->rcu_prev));
    if (pwrite(fd, &c, 1, 0) != 1)
        rc = -errno;
    else
        STORE(s->rcu_state, PX_RCU_RESTORED);
    close(fd);
    return rc;
}

/* Thaw mounts [0, upto) that are ours, last first.  A mount marked freezing is skipped
 * unless PX_THAW_IN_FLIGHT says its freezer is gone: a FITHAW issued while that FIFREEZE is
 * still in the kernel waits for it, and it may wait for a filesystem frozen behind it. */
static int thaw_range(px_set *s, int32_t upto, int32_t flags)
{
    int rc = 0;
    for (int32_t i = upto - 1; i >= 0; i--) {
        px_mount *m = &s->m[i];
        int32_t st = LOAD(m->state);
        if (st != PX_M_FROZEN && !(st == PX_M_FREEZING && (flags & PX_THAW_IN_FLIGHT)))
            continue;
        int fd = (flags & PX_THAW_GUARDIAN_FDS) ? m->guardian_fd : m->fd;
        if (fd < 0)
            continue;
        int64_t t0 = px_now_ns();
        int r = ioctl(fd, FITHAW, 0);
        int e = r < 0 ? errno : 0;
        /* EINVAL: not frozen any more (thawed behind our back, or by the other of controller
         * and guardian); either way it is no longer ours.  Any other error leaves it marked
         * frozen for a retry. */
        if (e == 0 || e == EINVAL) {
            m->thaw_start_ns = t0;
            m->thaw_end_ns = px_now_ns();
            m->thaw_errno = e;
            STORE(m->state, PX_M_THAWED);
        } else {
            m->thaw_errno = e;
        }
        if (e && !rc)
            rc = -e;
    }
    return rc;
}

/* Has the guardian fired, or been lost?  Sequentially consistent, paired with the guardian's
 * store of its state before it reads the mounts' states: of a mount frozen just as the guardian
 * fires, either the guardian sees it frozen and thaws it, or px_freeze sees the guardian fired
 * and thaws it itself (a second FITHAW answers EINVAL, harmlessly). */
static int guardian_fired(px_set *s)
{
    return __atomic_load_n(&s->guardian_state, __ATOMIC_SEQ_CST) >= PX_G_FIRED_DEADLINE;
}

int px_freeze(px_set *s, int32_t flags)
{
    int rc = 0;
    int rcu_fd = -1;
    int32_t n = s->n;

    s->flags = flags;
    s->failed_index = -1;
    s->failed_errno = 0;
    /* syncfs before the window: FIFREEZE must write back whatever is dirty, and doing
     * that here instead of inside the window shortens it. */
    if (flags & PX_FREEZE_PRESYNC) {
        for (int32_t i = 0; i < n; i++) {
            px_mount *m = &s->m[i];
            m->sync_start_ns = px_now_ns();
            m->sync_errno = syncfs(m->fd) < 0 ? errno : 0;
            m->sync_end_ns = px_now_ns();
        }
    }
    STORE(s->phase, PX_PHASE_FREEZING);
    if (flags & PX_FREEZE_EXPEDITE)
        rcu_fd = rcu_expedite(s);

    s->window_start_ns = px_now_ns();
    for (int32_t i = 0; i < n; i++) {
        px_mount *m = &s->m[i];
        if (guardian_fired(s)) { /* the bound passed before this FIFREEZE (a slow syncfs) */
            s->failed_index = i;
            s->failed_errno = ETIMEDOUT;
            rc = -ETIMEDOUT;
            break;
        }
        __atomic_store_n(&m->state, PX_M_FREEZING, __ATOMIC_SEQ_CST);
        m->freeze_start_ns = px_now_ns();
        int r = ioctl(m->fd, FIFREEZE, 0);
        int e = r < 0 ? errno : 0;
        m->freeze_end_ns = px_now_ns();
        m->freeze_errno = e;
        if (e == 0) {
            __atomic_store_n(&m->state, PX_M_FROZEN, __ATOMIC_SEQ_CST);
            if (!guardian_fired(s))
                continue;
            /* The bound passed while this FIFREEZE was in flight (it can wait for a
             * filesystem the guardian has just thawed): stop and undo our part. */
            s->failed_index = i + 1; /* thaw up to and including this one */
            s->failed_errno = ETIMEDOUT;
            rc = -ETIMEDOUT;
            break;
        }
        /* EBUSY: already frozen by someone else; it is theirs to thaw, never ours. */
        STORE(m->state, e == EBUSY ? PX_M_BUSY : PX_M_FAILED);
        s->failed_index = i;
        s->failed_errno = e;
        rc = -e;
        break;
    }
    if (rcu_fd >= 0)
        rcu_restore_fd(s, rcu_fd);
    if (rc < 0) {
        STORE(s->phase, PX_PHASE_THAWING);
        thaw_range(s, s->failed_index, 0); /* exactly the mounts this call froze */
        s->window_end_ns = px_now_ns();
        STORE(s->phase, PX_PHASE_DONE);
        return rc;
    }
    STORE(s->phase, PX_PHASE_FROZEN);
    return 0;
}

int px_thaw(px_set *s, int32_t flags)
{
    if (flags & PX_THAW_GUARDIAN_FDS) /* the guardian thaws; the window's phase is the controller's */
        return thaw_range(s, s->n, flags);
    STORE(s->phase, PX_PHASE_THAWING);
    int rc = thaw_range(s, s->n, flags);
    s->window_end_ns = px_now_ns();
    STORE(s->phase, PX_PHASE_DONE);
    return rc;
}
