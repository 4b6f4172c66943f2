/* pyexec native core: the one C API under both bindings (Cython and cffi).
 *
 * Every function returns 0 or a negative errno and never prints.  Structures have
 * fixed-width fields only, so the Python side can lay them out in memory it owns
 * (a bytearray, or a journal page shared with the thaw guardian) and read them back.
 *
 * This header is the one declaration of the API.  Its bound part (before "end of the bound API")
 * is read at build time by native/api_gen.py, which derives cffi's cdef, the Cython declarations
 * (pyexec/_core.pxd) and the Python constants and struct layouts (pyexec/native/_api.py); both
 * bindings compare the compiler's sizes and offsets with those layouts when they load.  Adding a
 * field to a struct touches this header and the C that fills it, nothing else. */
#ifndef PYEXEC_CORE_H
#define PYEXEC_CORE_H

#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define PX_MAX_MOUNTS 128
#define PX_SET_MAGIC 0x50584653u /* "PXFS" */
#define PX_SET_VERSION 1u /* px_set's layout: a page of another version is not read (recover, guardian) */

/* Per-mount state, read by the guardian through shared memory. */
#define PX_M_IDLE 0
#define PX_M_FREEZING 1 /* FIFREEZE in flight */
#define PX_M_FROZEN 2   /* frozen by us: ours to thaw */
#define PX_M_BUSY 3     /* FIFREEZE said EBUSY: someone else holds it, never thaw */
#define PX_M_THAWED 4
#define PX_M_FAILED 5   /* FIFREEZE failed otherwise: not frozen */

/* px_freeze flags */
#define PX_FREEZE_EXPEDITE 1 /* rcu_expedited=1 around the FIFREEZE loop */
#define PX_FREEZE_PRESYNC 2  /* syncfs() each filesystem before the window */
#define PX_FREEZE_HOLD 4     /* the controller's death does not end the window: the guardian holds it to
                              * the deadline (a group run's host, whose early thaw a commit could miss) */

/* px_thaw flags */
#define PX_THAW_GUARDIAN_FDS 1 /* use each mount's guardian_fd (the guardian's own table) */
#define PX_THAW_IN_FLIGHT 2    /* also thaw mounts marked freezing: only once their freezer is dead,
                                * since a FITHAW behind an in-flight FIFREEZE waits for it (s_umount) */

/* guardian_state values (written by the guardian, except PX_G_LOST) */
#define PX_G_NONE 0
#define PX_G_READY 1
#define PX_G_FIRED_DEADLINE 2
#define PX_G_FIRED_DIED 3 /* the controller died inside the window */
#define PX_G_LOST 4       /* written by the controller: the guardian died */

/* rcu_state values */
#define PX_RCU_UNTOUCHED 0
#define PX_RCU_SET 1      /* we wrote 1; rcu_prev holds the value to put back */
#define PX_RCU_RESTORED 2 /* we put rcu_prev back */
#define PX_RCU_SKIPPED 3  /* file absent or not writable: freeze ran unexpedited */
#define PX_RCU_ALREADY 4  /* it was already 1: nothing to do or undo */

/* set phase */
#define PX_PHASE_IDLE 0
#define PX_PHASE_FREEZING 1
#define PX_PHASE_FROZEN 2
#define PX_PHASE_THAWING 3
#define PX_PHASE_DONE 4

typedef struct px_mount {
    int32_t fd;
    int32_t state;
    int32_t freeze_errno;
    int32_t thaw_errno;
    int32_t sync_errno;
    int32_t guardian_fd; /* the guardian's own fd for this mount (its table, not ours) */
    int64_t sync_start_ns;
    int64_t sync_end_ns;
    int64_t freeze_start_ns;
    int64_t freeze_end_ns;
    int64_t thaw_start_ns;
    int64_t thaw_end_ns;
} px_mount;

typedef struct px_set {
    uint32_t magic;
    uint32_t version;
    int32_t n;
    int32_t flags;
    int32_t phase;
    int32_t rcu_state;
    int32_t rcu_prev;
    int32_t failed_index; /* -1: none */
    int32_t failed_errno;
    int32_t controller_pid;
    int32_t guardian_pid;
    int32_t guardian_state; /* written by the guardian */
    int64_t deadline_ns;    /* absolute CLOCK_MONOTONIC bound the guardian enforces; 0 = none */
    int64_t window_start_ns;
    int64_t window_end_ns;
    px_mount m[PX_MAX_MOUNTS];
} px_set;

/* Output capture: the first and last PX_CAP_HALF bytes, and a count of the rest. */
#define PX_CAP_HALF 65536
typedef struct px_capture {
    uint64_t total;
    uint64_t dropped;
    uint32_t head_len;
    uint32_t tail_len;
    uint32_t tail_pos;
    uint32_t eof;
    uint8_t head[PX_CAP_HALF];
    uint8_t tail[PX_CAP_HALF];
} px_capture;

typedef struct px_proc {
    int32_t pid;
    int32_t pidfd;
    int32_t out_fd;
    int32_t err_fd;
} px_proc;

typedef struct px_status {
    int32_t code;   /* exit status, or -1 when killed by a signal */
    int32_t signal; /* terminating signal, or 0 */
    int64_t exit_seen_ns; /* CLOCK_MONOTONIC when the pidfd reported the exit */
} px_status;

/* Kernel features in use (1) or replaced by their fallback (0), each a probe of the running kernel
 * made once per process (native/probe.c) and forced to 0 by its name in PYEXEC_DISABLE (close_range
 * for close_range_cloexec); the comment gives the kernel that brought it and the fallback. */
typedef struct px_features {
    int32_t pidfd_open;          /* 5.3: else a waiter thread's pipe signals the exit */
    int32_t waitid_pidfd;        /* 5.4: else waitid(P_PID) on the unreaped pid */
    int32_t clone3_cgroup;       /* 5.7: else the vfork child writes itself into cgroup.procs */
    int32_t close_range_cloexec; /* 5.11: else the child walks /proc/self/fd with getdents64 */
    int32_t cgroup_kill;         /* 5.14, cgroup v2: else freeze the cgroup (5.2), kill each pid, thaw */
    int32_t cgroup_freeze;       /* 5.2, cgroup v2: else one pass killing each pid of cgroup.procs */
    int32_t openat2;             /* 5.6: else a mount point is opened by an O_NOFOLLOW walk from / */
    int32_t cgroup2;             /* cgroup v2 mounted (4.5): else the scripts' cgroups are v1 freezer's */
    int32_t cgroup_v1;           /* a cgroup v1 hierarchy mounted (2.6.24): without either, no cgroup */
} px_features;

int px_probe(px_features *out);

int64_t px_now_ns(void);

/* Prepare s for n fds (n <= PX_MAX_MOUNTS), all idle. */
int px_set_init(px_set *s, const int32_t *fds, int32_t n);
/* FIFREEZE s->m[0..n) in order.  On the first failure thaw, in reverse, exactly the
 * mounts this call froze and return -errno (s->failed_index says which).  If the guardian
 * fires (or is lost) meanwhile, stop, thaw what this call froze and return -ETIMEDOUT. */
int px_freeze(px_set *s, int32_t flags);
/* FITHAW, in reverse, every mount marked frozen (and, with PX_THAW_IN_FLIGHT, freezing);
 * every thaw is tried.  Returns 0 or the first -errno; each mount keeps its thaw_errno.
 * The one thaw of pyexec: the controller, the guardian and recover all call it. */
int px_thaw(px_set *s, int32_t flags);
/* Put rcu_expedited back if s says we set it and did not restore it (crash path). */
int px_rcu_restore(px_set *s);

/* Spawn argv with envp.  path == NULL executes exec_fd itself (as /proc/self/fd/3 in the
 * child); path != NULL executes path, with exec_fd (if >= 0) visible as fd 3 in the child.
 * cgroup_fd >= 0 starts the child inside that cgroup v2 directory; -1 in none;
 * PX_SPAWN_DIE_WITH_PARENT in none, and the kernel kills it when the calling thread dies. */
#define PX_SPAWN_DIE_WITH_PARENT (-2)
int px_spawn(const char *path, int exec_fd, char *const argv[], char *const envp[],
             int cgroup_fd, px_proc *p);
/* Spawn a helper that must outlive the caller and the caller's cgroup (the guardian, the warden):
 * as px_spawn, but inside every cgroup of cgroup_fds (pyexec's own, one per hierarchy) before any
 * of it runs: a cgroup v2 directory by clone3 CLONE_INTO_CGROUP (5.7), the others (all of them on
 * older kernels) joined by the child before it execs.  Never killed with the caller. */
#define PX_MAX_CGROUPS 4
int px_spawn_helper(const char *path, int exec_fd, char *const argv[], char *const envp[],
                    const int32_t *cgroup_fds, int32_t n, px_proc *p);
/* Drain output until the process exits (then reap it), deadline_ns passes (-ETIMEDOUT,
 * not reaped) or cancel_fd (if >= 0) is readable (-ECANCELED, not reaped; cancel_fd is not
 * read, so every wait on it wakes).  deadline_ns < 0: no deadline. */
int px_wait(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
            px_capture *err, px_status *st);
/* SIGTERM the child's process group, wait up to grace_ns, SIGKILL the group (and
 * cgroup.kill if cgroup_fd >= 0), then wait up to kill_wait_ns and reap. */
int px_kill_tree(const px_proc *p, int cgroup_fd, int64_t grace_ns, int64_t kill_wait_ns,
                 px_capture *out, px_capture *err, px_status *st);
/* How long a killed tree is awaited before giving up on it: px_kill_tree's kill_wait_ns for the
 * scripts and the guardian, and the warden's wait for a dead controller's scripts. */
#define PX_KILL_WAIT_NS 5000000000LL

/* The one watch of the caller's parent (parent: the pid that started the caller), whoever
 * watches: the guardian and the warden (their controller), safefreeze (the Azure extension).
 * *fd becomes an fd that polls readable (or hung up) once parent is gone: its pidfd (pidfd_open,
 * 5.3), or before 5.3, where life_fd >= 0, parent's life pipe (life_fd in its table: it holds the
 * only write end, close-on-exec) reopened through /proc.  With neither and death_sig > 0, *fd is -1
 * and the kernel sends death_sig when parent dies (px_parent_death_signal).  Returns 0, or -errno
 * (-ESRCH: parent is gone already, the caller has been reparented; -ENOSYS: no way to watch). */
int px_watch_parent(int32_t parent, int life_fd, int death_sig, int32_t *fd);

/* ---- end of the bound API: what follows is shared by the C files only ---- */

/* The time left until an absolute CLOCK_MONOTONIC deadline, as a ppoll timeout (0 if past). */
static inline void px_left_ts(int64_t deadline_ns, int64_t now_ns, struct timespec *ts)
{
    int64_t left = deadline_ns - now_ns;
    if (left < 0)
        left = 0;
    ts->tv_sec = left / 1000000000LL;
    ts->tv_nsec = left % 1000000000LL;
}

/* The probed features (probe.c), for the C files that pick a path by them. */
const px_features *px_features_get(void);

/* Wait, as px_wait, but do not reap (-ETIMEDOUT / -ECANCELED / 0 once it has exited); reap. */
int px_wait_exit(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
                 px_capture *err, int64_t *seen_ns);
int px_reap(const px_proc *p, px_status *st);

/* Ask the kernel to send sig to the caller when its parent dies (PR_SET_PDEATHSIG; prctl(2): it
 * fires when the thread that started the caller ends).  Returns 0, or -ESRCH if parent is gone
 * already.  Async-signal-safe: px_spawn's child calls it between vfork and exec (a script with no
 * cgroup dies with pyexec), as px_watch_parent does where there is no fd to watch. */
int px_parent_death_signal(pid_t parent, int sig);

/* Whether a cgroup directory fd is of a v1 hierarchy (the freezer's, on a v1-only machine). */
int px_cgroup_is_v1(int cgroup_fd);

/* SIGKILL every process in a cgroup and its descendants (cgroup.kill, else its fallbacks: see
 * kill.c), then wait until it is empty or the deadline passes: 0 once it is empty, -ETIMEDOUT if
 * it is still populated at the deadline, -ENOSYS where that cannot be awaited (v1 without
 * pidfd_open), or the -errno of the kill.  For the warden; scripts are killed by px_kill_tree. */
int px_cgroup_kill(int cgroup_fd, int64_t deadline_ns);

/* A guardian's last act once its controller is gone: move into each of parents (<mount>/pyexec,
 * pyexec's directory in each hierarchy, where the warden lives), then remove <parent>/<ctl>/guard
 * and <parent>/<ctl> where they are empty.  Whoever of the warden and the guardians is last removes
 * them (a cgroup v1 machine without pidfd_open gives the warden no way to await the guardians). */
void px_helper_leave(const char *ctl, char *const parents[], int n);
/* The guardians' leaf in a controller's cgroup directory (pyexec/cgroups.py's GUARD). */
#define PX_GUARD_LEAF "guard"

/* Wait until a cgroup is empty (0) or the deadline passes (-ETIMEDOUT): an event on v2
 * (cgroup.events); on v1 the pidfds of the pids it lists (-ENOSYS without pidfd_open).  For the
 * warden, waiting for the guardians to leave. */
int px_cgroup_wait_empty(int cgroup_fd, int64_t deadline_ns);

#endif
