/* Spawn a script: pipes for its output, /dev/null as stdin, cwd /, its own session, its own
 * cgroup when given one, and an fd that becomes readable when it exits (its pidfd, or on kernels
 * without pidfd_open a pipe a waiter thread writes to).  Every path is event-driven.
 *
 * Paths, by kernel (each probed once, native/probe.c):
 *   cgroup given, clone3 CLONE_INTO_CGROUP (5.7): clone3 puts the child in it before it runs;
 *   cgroup given, older: the vfork child writes itself into cgroup.procs before it execs;
 *   no cgroup: posix_spawn (glibc >= 2.34 for closefrom), else the same vfork child. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2) /* kernel 5.11 */
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL /* kernel 5.7 */
#endif
/* posix_spawn_file_actions_addclosefrom_np: glibc 2.34; addchdir_np: 2.29.  Older glibc (RHEL 8
 * has 2.28) spawns through the vfork child, which does both itself.  PX_GLIBC_BEFORE_2_34 builds that
 * way here too (tests/test_build.py checks that such a build needs no newer glibc symbol). */
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 34) && !defined(PX_GLIBC_BEFORE_2_34)
#define HAVE_SPAWN_CLOSEFROM 1
#else
#define HAVE_SPAWN_CLOSEFROM 0
#endif

/* The fd the child sees exec_fd as (the guardian's page, the warden's cgroup directory). */
#define CHILD_EXEC_FD 3
#define CHILD_EXEC_PATH "/proc/self/fd/3"
#define CHILD_STACK_SIZE 65536

/* Move fd to a number >= 3 (close-on-exec) so that dup2 onto 0..2 cannot clobber it. */
static int fd_above_stdio(int fd)
{
    if (fd >= 3)
        return fd;
    int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    int e = errno;
    close(fd);
    errno = e;
    return nfd;
}

static int make_pipe(int *rd, int *wr)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -errno;
    p[0] = fd_above_stdio(p[0]);
    p[1] = fd_above_stdio(p[1]);
    if (p[0] < 0 || p[1] < 0) {
        int e = errno;
        if (p[0] >= 0)
            close(p[0]);
        if (p[1] >= 0)
            close(p[1]);
        return -e;
    }
    if (fcntl(p[0], F_SETFL, O_NONBLOCK) < 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        return -e;
    }
    *rd = p[0];
    *wr = p[1];
    return 0;
}

#if HAVE_SPAWN_CLOSEFROM
static int spawn_posix(const char *path, int exec_fd, char *const argv[], char *const envp[],
                       int out_w, int err_w, pid_t *pid)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    sigset_t none, all;
    int rc;

    if ((rc = posix_spawn_file_actions_init(&fa)) != 0)
        return -rc;
    if ((rc = posix_spawnattr_init(&at)) != 0) {
        posix_spawn_file_actions_destroy(&fa);
        return -rc;
    }
    sigemptyset(&none);
    sigfillset(&all);
    /* SETSID: the script leads its own session and process group, so its whole tree can be
     * signalled at once.  SETSIGDEF for every signal: Python ignores SIGPIPE and SIGXFSZ and
     * children would inherit that. */
    if ((rc = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
                                                POSIX_SPAWN_SETSIGDEF)) != 0 ||
        (rc = posix_spawnattr_setsigmask(&at, &none)) != 0 ||
        (rc = posix_spawnattr_setsigdefault(&at, &all)) != 0 ||
        (rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)) != 0 ||
        (rc = posix_spawn_file_actions_adddup2(&fa, out_w, 1)) != 0 ||
        (rc = posix_spawn_file_actions_adddup2(&fa, err_w, 2)) != 0 ||
        /* dup2 to itself or another number clears close-on-exec */
        (exec_fd >= 0 && (rc = posix_spawn_file_actions_adddup2(&fa, exec_fd, CHILD_EXEC_FD)) != 0) ||
        (rc = posix_spawn_file_actions_addclosefrom_np(&fa, exec_fd >= 0 ? CHILD_EXEC_FD + 1 : 3)) != 0 ||
        (rc = posix_spawn_file_actions_addchdir_np(&fa, "/")) != 0)
        goto done;
    /* glibc runs the child with CLONE_VFORK and reports an exec failure as the return value, so
     * ENOENT/EACCES/ENOEXEC come back here, not as a child exiting 127. */
    rc = posix_spawn(pid, path ? path : CHILD_EXEC_PATH, &fa, &at, argv, envp);
done:
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    return -rc;
}
#endif

/* What the vfork child needs between clone and execve. */
struct child_args {
    const char *path;
    int exec_fd, out_w, err_w, devnull, ep_w;
    int cg_procs[PX_MAX_CGROUPS]; /* cgroup.procs of each cgroup the child joins itself */
    int n_cg_procs;
    int close_range_ok;
    pid_t die_with; /* > 0: SIGKILL the child when this parent dies (no cgroup to kill it by) */
    char *const *argv, *const *envp;
};

/* How a child is placed and whether it dies with us. */
enum spawn_mode {
    SPAWN_SCRIPT,          /* in its cgroup (if any); dies with us only while it joins it itself */
    SPAWN_DIE_WITH_PARENT, /* in no cgroup: the kernel kills it when the calling thread dies */
    SPAWN_HELPER,          /* outlives us: never killed with us */
};

/* Mark every fd from `low` up close-on-exec without close_range (kernel < 5.11): walk
 * /proc/self/fd with getdents64, async-signal-safe as CPython's _close_open_fds_safe. */
static int cloexec_from_walk(int low)
{
    char buf[1024];
    int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) {
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
            return -1;
        for (rlim_t fd = (rlim_t)low; fd < rl.rlim_cur; fd++)
            fcntl((int)fd, F_SETFD, FD_CLOEXEC);
        return 0;
    }
    for (;;) {
        long n = syscall(SYS_getdents64, dir, buf, sizeof(buf));
        if (n <= 0)
            break;
        for (long off = 0; off < n;) {
            struct dirent64 *d = (void *)(buf + off);
            int fd = 0, digits = 0;
            for (const char *c = d->d_name; *c >= '0' && *c <= '9'; c++, digits++)
                fd = fd * 10 + (*c - '0');
            if (digits && fd >= low && fd != dir)
                fcntl(fd, F_SETFD, FD_CLOEXEC);
            off += d->d_reclen;
        }
    }
    close(dir);
    return 0;
}

/* The child, until execve: only async-signal-safe calls, as in CPython's child_exec.  On
 * failure its errno goes to the error pipe. */
static int child_exec(void *arg)
{
    const struct child_args *a = arg;
    sigset_t none;
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        sigaction(sig, &dfl, NULL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* With no cgroup and no warden, the kernel kills the script if pyexec dies (its process group
     * and setsid'd descendants can escape: README).  The parent may have died already. */
    if (a->die_with > 0) {
        int rc = px_parent_death_signal(a->die_with, SIGKILL);
        if (rc < 0) {
            errno = -rc;
            goto fail;
        }
    }
    /* Join the cgroups first, before anything of the program runs (without CLONE_INTO_CGROUP). */
    for (int i = 0; i < a->n_cg_procs; i++)
        if (write(a->cg_procs[i], "0", 1) != 1)
            goto fail;
    if (setsid() < 0 || chdir("/") < 0)
        goto fail;
    if (dup2(a->devnull, 0) < 0 || dup2(a->out_w, 1) < 0 || dup2(a->err_w, 2) < 0)
        goto fail;
    if (a->exec_fd >= 0) {
        if (a->exec_fd == CHILD_EXEC_FD) {
            if (fcntl(a->exec_fd, F_SETFD, 0) < 0)
                goto fail;
        } else if (dup2(a->exec_fd, CHILD_EXEC_FD) < 0) {
            goto fail;
        }
    }
    /* Mark the rest close-on-exec rather than closing it: the error pipe must survive until
     * execve succeeds. */
    int low = a->exec_fd >= 0 ? CHILD_EXEC_FD + 1 : 3;
    if (!a->close_range_ok || syscall(SYS_close_range, low, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        if (cloexec_from_walk(low) < 0)
            goto fail;
    execve(a->path ? a->path : CHILD_EXEC_PATH, a->argv, a->envp);
fail:;
    int e = errno;
    ssize_t w = write(a->ep_w, &e, sizeof(e));
    (void)w;
    _exit(127);
}

#if defined(__x86_64__)
/* clone3 with CLONE_VM|CLONE_VFORK, the child on a stack of its own, as posix_spawn does: no
 * copy of the (large) parent's page tables.  glibc 2.36 exports no clone3 wrapper, and a raw
 * syscall cannot return into C on a new stack, so the child's first steps are assembly:
 * call fn(arg) on the new stack, then exit.  fn and arg ride in callee-saved registers, which
 * the child inherits. */
static long clone3_on_stack(struct clone_args *ca, int (*fn)(void *), void *arg)
{
    register long rax __asm__("rax") = SYS_clone3;
    register struct clone_args *rdi __asm__("rdi") = ca;
    register size_t rsi __asm__("rsi") = sizeof(*ca);
    register int (*r12)(void *) __asm__("r12") = fn;
    register void *r13 __asm__("r13") = arg;
    __asm__ volatile("syscall\n\t"
                     "testq %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "xorl %%ebp, %%ebp\n\t"
                     "movq %%r13, %%rdi\n\t"
                     "callq *%%r12\n\t"
                     "movl %%eax, %%edi\n\t"
                     "movl $60, %%eax\n\t" /* SYS_exit */
                     "syscall\n\t"
                     "hlt\n\t"
                     "1:\n\t"
                     : "+r"(rax)
                     : "r"(rdi), "r"(rsi), "r"(r12), "r"(r13)
                     : "rcx", "r11", "memory");
    return rax;
}
#endif

/* The vfork child path: clone3 into the cgroup v2 directory of cgroup_fds where the kernel can
 * (5.7), the child joining the others (and that one, on older kernels) itself; else glibc's clone
 * with CLONE_VM|CLONE_VFORK.  *pidfd is the child's pidfd when clone3 made one, else -1. */
static int spawn_clone(const char *path, int exec_fd, char *const argv[], char *const envp[],
                       int out_w, int err_w, const int32_t *cgroup_fds, int n_cg, enum spawn_mode mode,
                       pid_t *pid, int *pidfd)
{
    const px_features *f = px_features_get();
    int ep_r = -1, ep_w = -1, devnull = -1, rc;
    int child_pidfd = -1;
    long r = -1;
    int e = 0;
    _Alignas(16) char stack[CHILD_STACK_SIZE];
    struct child_args a = {.path = path, .exec_fd = exec_fd, .out_w = out_w, .err_w = err_w, .devnull = -1,
                           .ep_w = -1, .close_range_ok = f->close_range_cloexec, .argv = argv, .envp = envp};
    *pidfd = -1;
    if (n_cg < 0 || n_cg > PX_MAX_CGROUPS)
        return -EINVAL;
    if ((rc = make_pipe(&ep_r, &ep_w)) < 0)
        return rc;
    a.ep_w = ep_w;
    devnull = a.devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (devnull < 0) {
        rc = -errno;
        goto done;
    }
    /* CLONE_INTO_CGROUP takes one cgroup v2 directory; v1 directories are joined by the child. */
    int into = -1;
    for (int i = 0; i < n_cg && f->clone3_cgroup && into < 0; i++)
        if (!px_cgroup_is_v1(cgroup_fds[i]))
            into = cgroup_fds[i];
    for (int i = 0; i < n_cg; i++) {
        if (cgroup_fds[i] == into)
            continue;
        int fd = openat(cgroup_fds[i], "cgroup.procs", O_WRONLY | O_CLOEXEC);
        if (fd < 0) {
            rc = -errno;
            goto done;
        }
        a.cg_procs[a.n_cg_procs++] = fd;
    }
    /* A script that joins its cgroup itself is outside it for a moment: if we die then, the warden's
     * sweep would miss it, so it dies with us instead (and without any cgroup it always does).  A
     * helper must outlive us: the vfork child is suspended with us until it has joined, so a kill
     * of our cgroup in that moment ends both before the helper has anything to do. */
    int die_with_us = mode == SPAWN_DIE_WITH_PARENT || (mode == SPAWN_SCRIPT && a.n_cg_procs > 0);
    a.die_with = die_with_us ? getpid() : 0;
    /* The child shares our memory until it execs: no handler of ours may run in it, so every
     * signal stays blocked across the clone (the child resets handlers, then unblocks). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (into >= 0) {
        struct clone_args ca;
        memset(&ca, 0, sizeof(ca));
        ca.flags = CLONE_PIDFD | CLONE_INTO_CGROUP | CLONE_VFORK;
        ca.pidfd = (uint64_t)(uintptr_t)&child_pidfd;
        ca.exit_signal = SIGCHLD;
        ca.cgroup = (uint64_t)into;
#if defined(__x86_64__)
        ca.flags |= CLONE_VM;
        ca.stack = (uint64_t)(uintptr_t)stack;
        ca.stack_size = sizeof(stack);
        r = clone3_on_stack(&ca, child_exec, &a);
        e = r < 0 ? (int)-r : 0;
#else
        r = syscall(SYS_clone3, &ca, sizeof(ca));
        if (r == 0)
            child_exec(&a);
        e = r < 0 ? errno : 0;
#endif
    } else {
        r = clone(child_exec, stack + sizeof(stack), CLONE_VM | CLONE_VFORK | SIGCHLD, &a);
        e = r < 0 ? errno : 0;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(ep_w);
    ep_w = -1;
    if (r < 0) {
        rc = -e;
        goto done;
    }
    /* CLONE_VFORK: the child has exec'd or died by now; the pipe holds its errno if any. */
    int child_errno = 0;
    ssize_t got;
    do {
        got = read(ep_r, &child_errno, sizeof(child_errno));
    } while (got < 0 && errno == EINTR);
    if (got == (ssize_t)sizeof(child_errno) && child_errno) {
        siginfo_t si;
        while (waitid(P_PID, (id_t)r, &si, WEXITED) < 0 && errno == EINTR)
            ;
        if (child_pidfd >= 0)
            close(child_pidfd);
        rc = -child_errno;
        goto done;
    }
    *pid = (pid_t)r;
    *pidfd = child_pidfd;
    rc = 0;
done:
    if (ep_r >= 0)
        close(ep_r);
    if (ep_w >= 0)
        close(ep_w);
    if (devnull >= 0)
        close(devnull);
    for (int i = 0; i < a.n_cg_procs; i++)
        close(a.cg_procs[i]);
    return rc;
}

/* Without pidfd_open (kernel < 5.3): a detached thread waits for this one child (WNOWAIT: it
 * stays unreaped, so its pid stays ours) and then closes the write end of a pipe.  The read end
 * polls like a pidfd; other children of the process, subprocess's included, are not touched. */
struct waiter {
    pid_t pid;
    int wfd;
};

static void *wait_one(void *arg)
{
    struct waiter w = *(struct waiter *)arg;
    free(arg);
    siginfo_t si;
    while (waitid(P_PID, (id_t)w.pid, &si, WEXITED | WNOWAIT) < 0 && errno == EINTR)
        ;
    close(w.wfd);
    return NULL;
}

static int exit_pipe(pid_t pid)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
        return -errno;
    struct waiter *w = malloc(sizeof(*w));
    if (w == NULL) {
        close(p[0]);
        close(p[1]);
        return -ENOMEM;
    }
    w->pid = pid;
    w->wfd = p[1];
    pthread_attr_t at;
    pthread_t t;
    sigset_t all, old;
    int rc = pthread_attr_init(&at);
    if (rc == 0)
        rc = pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    if (rc == 0)
        rc = pthread_attr_setstacksize(&at, 65536);
    /* The thread takes no signal: Python's handlers run in its main thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (rc == 0)
        rc = pthread_create(&t, &at, wait_one, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&at);
    if (rc != 0) {
        free(w);
        close(p[0]);
        close(p[1]);
        return -rc;
    }
    return p[0];
}

static int spawn_any(const char *path, int exec_fd, char *const argv[], char *const envp[],
                     const int32_t *cgroup_fds, int n_cg, enum spawn_mode mode, px_proc *p)
{
    int out_r = -1, out_w = -1, err_r = -1, err_w = -1, rc, pidfd = -1;
    pid_t pid = -1;

    p->pid = p->pidfd = p->out_fd = p->err_fd = -1;
    if (!path && exec_fd < 0)
        return -EINVAL;
    if ((rc = make_pipe(&out_r, &out_w)) < 0)
        return rc;
    if ((rc = make_pipe(&err_r, &err_w)) < 0)
        goto done;
#if HAVE_SPAWN_CLOSEFROM
    if (n_cg == 0 && mode == SPAWN_SCRIPT)
        rc = spawn_posix(path, exec_fd, argv, envp, out_w, err_w, &pid);
    else
#endif
        rc = spawn_clone(path, exec_fd, argv, envp, out_w, err_w, cgroup_fds, n_cg, mode, &pid, &pidfd);
    if (rc < 0)
        goto done;
    if (pidfd < 0) {
        /* The child is unreaped, so its pid cannot be reused before this. */
        pidfd = px_features_get()->pidfd_open ? (int)syscall(SYS_pidfd_open, pid, 0) : exit_pipe(pid);
        if (pidfd < 0) {
            rc = px_features_get()->pidfd_open ? -errno : pidfd;
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            goto done;
        }
    }
    p->pid = pid;
    p->pidfd = pidfd;
    p->out_fd = out_r;
    p->err_fd = err_r;
    out_r = err_r = -1;
done:
    if (out_w >= 0)
        close(out_w);
    if (err_w >= 0)
        close(err_w);
    if (out_r >= 0)
        close(out_r);
    if (err_r >= 0)
        close(err_r);
    return rc;
}

int px_spawn(const char *path, int exec_fd, char *const argv[], char *const envp[],
             int cgroup_fd, px_proc *p)
{
    int32_t fd = cgroup_fd;
    if (cgroup_fd >= 0)
        return spawn_any(path, exec_fd, argv, envp, &fd, 1, SPAWN_SCRIPT, p);
    return spawn_any(path, exec_fd, argv, envp, NULL, 0,
                     cgroup_fd == PX_SPAWN_DIE_WITH_PARENT ? SPAWN_DIE_WITH_PARENT : SPAWN_SCRIPT, p);
}

int px_spawn_helper(const char *path, int exec_fd, char *const argv[], char *const envp[],
                    const int32_t *cgroup_fds, int32_t n, px_proc *p)
{
    return spawn_any(path, exec_fd, argv, envp, cgroup_fds, n, SPAWN_HELPER, p);
}
