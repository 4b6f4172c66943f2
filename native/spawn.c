/* Spawn a script, wait for it on its pidfd while draining its output, kill its tree.
 * No polling: one ppoll over the pidfd and both pipes with the deadline as timeout. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3 /* waitid(P_PIDFD): kernel 5.4 */
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2) /* kernel 5.11 */
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL /* kernel 5.7 */
#endif

/* The fd the child sees the checked script as; the interpreter of a #! script
 * opens /proc/self/fd/3, so it must stay open across exec (not close-on-exec). */
#define CHILD_EXEC_FD 3
#define CHILD_EXEC_PATH "/proc/self/fd/3"

static int sys_pidfd_open(pid_t pid)
{
    return (int)syscall(SYS_pidfd_open, pid, 0); /* kernel 5.3 */
}

static int sys_pidfd_send_signal(int pidfd, int sig)
{
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0); /* kernel 5.1 */
}

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

static int spawn_posix(const char *path, int exec_fd, char *const argv[], char *const envp[],
                       int out_w, int err_w, pid_t *pid)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    sigset_t none, all;
    int rc;

    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&at);
    sigemptyset(&none);
    sigfillset(&all);
    /* SETSID: the script leads its own session and process group, so its whole tree
     * can be signalled at once.  SETSIGDEF for every signal: Python ignores SIGPIPE
     * and SIGXFSZ and children would inherit that. */
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
                                      POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &all);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, out_w, 1);
    posix_spawn_file_actions_adddup2(&fa, err_w, 2);
    if (exec_fd >= 0) /* dup2 to itself or another number clears close-on-exec */
        posix_spawn_file_actions_adddup2(&fa, exec_fd, CHILD_EXEC_FD);
    posix_spawn_file_actions_addclosefrom_np(&fa, exec_fd >= 0 ? CHILD_EXEC_FD + 1 : 3); /* glibc 2.34 */
    posix_spawn_file_actions_addchdir_np(&fa, "/"); /* glibc 2.29 */
    /* glibc runs the child with CLONE_VFORK and reports an exec failure as the return
     * value, so ENOENT/EACCES/ENOEXEC come back here, not as a child exiting 127. */
    rc = posix_spawn(pid, path ? path : CHILD_EXEC_PATH, &fa, &at, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    return -rc;
}

/* What the child of the cgroup path needs between clone3 and execve. */
struct child_args {
    const char *path;
    int exec_fd, out_w, err_w, devnull, ep_w;
    char *const *argv, *const *envp;
};

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
    /* Mark the rest close-on-exec rather than closing it: the error pipe must
     * survive until execve succeeds. */
    syscall(SYS_close_range, a->exec_fd >= 0 ? CHILD_EXEC_FD + 1 : 3, ~0U, CLOSE_RANGE_CLOEXEC);
    execve(a->path ? a->path : CHILD_EXEC_PATH, a->argv, a->envp);
fail:;
    int e = errno;
    ssize_t w = write(a->ep_w, &e, sizeof(e));
    (void)w;
    _exit(127);
}

#if defined(__x86_64__)
#define CHILD_STACK_SIZE 65536
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

/* The cgroup path: clone3(CLONE_INTO_CGROUP) places the child in its cgroup before it
 * runs a single instruction of the script, so cgroup.kill reaches every descendant, even
 * one that calls setsid.  glibc 2.36 has no posix_spawnattr_setcgroup_np (2.39). */
static int spawn_clone3(const char *path, int exec_fd, char *const argv[], char *const envp[],
                        int out_w, int err_w, int cgroup_fd, pid_t *pid, int *pidfd)
{
    int ep_r, ep_w, rc;
    if ((rc = make_pipe(&ep_r, &ep_w)) < 0)
        return rc;
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (devnull < 0) {
        rc = -errno;
        close(ep_r);
        close(ep_w);
        return rc;
    }
    struct child_args a = {path, exec_fd, out_w, err_w, devnull, ep_w, argv, envp};
    int child_pidfd = -1;
    struct clone_args ca;
    memset(&ca, 0, sizeof(ca));
    ca.flags = CLONE_PIDFD | CLONE_INTO_CGROUP | CLONE_VFORK;
    ca.pidfd = (uint64_t)(uintptr_t)&child_pidfd;
    ca.exit_signal = SIGCHLD;
    ca.cgroup = (uint64_t)cgroup_fd;
#if defined(__x86_64__)
    /* The child shares our memory until it execs: no handler of ours may run in it, so every
     * signal stays blocked across the clone (the child resets handlers, then unblocks). */
    _Alignas(16) char stack[CHILD_STACK_SIZE];
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    ca.flags |= CLONE_VM;
    ca.stack = (uint64_t)(uintptr_t)stack;
    ca.stack_size = sizeof(stack);
    long r = clone3_on_stack(&ca, child_exec, &a);
    int e = r < 0 ? (int)-r : 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
#else
    long r = syscall(SYS_clone3, &ca, sizeof(ca));
    if (r == 0)
        child_exec(&a);
    int e = r < 0 ? errno : 0;
#endif
    close(ep_w);
    close(devnull);
    if (r < 0) {
        close(ep_r);
        return -e;
    }
    /* CLONE_VFORK: the child has exec'd or died by now; the pipe holds its errno if any. */
    int child_errno = 0;
    ssize_t got;
    do {
        got = read(ep_r, &child_errno, sizeof(child_errno));
    } while (got < 0 && (errno == EINTR || errno == EAGAIN));
    close(ep_r);
    if (got == (ssize_t)sizeof(child_errno) && child_errno) {
        siginfo_t si;
        syscall(SYS_waitid, P_PIDFD, child_pidfd, &si, WEXITED, NULL);
        close(child_pidfd);
        return -child_errno;
    }
    *pid = (pid_t)r;
    *pidfd = child_pidfd;
    return 0;
}

int px_spawn(const char *path, int exec_fd, char *const argv[], char *const envp[],
             int cgroup_fd, px_proc *p)
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
    if (cgroup_fd >= 0) {
        rc = spawn_clone3(path, exec_fd, argv, envp, out_w, err_w, cgroup_fd, &pid, &pidfd);
    } else {
        rc = spawn_posix(path, exec_fd, argv, envp, out_w, err_w, &pid);
        if (rc == 0) {
            /* The child is unreaped, so its pid cannot be reused before this. */
            pidfd = sys_pidfd_open(pid);
            if (pidfd < 0) {
                rc = -errno;
                kill(pid, SIGKILL);
                waitpid(pid, NULL, 0);
            }
        }
    }
    if (rc < 0)
        goto done;
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
static int wait_exit(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
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

static int reap(const px_proc *p, px_status *st)
{
    siginfo_t si;
    struct rusage ru;
    memset(&si, 0, sizeof(si));
    memset(&ru, 0, sizeof(ru));
    /* The raw waitid takes a rusage pointer that glibc's wrapper does not expose. */
    long r;
    do {
        r = syscall(SYS_waitid, P_PIDFD, p->pidfd, &si, WEXITED, &ru);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    st->code = si.si_code == CLD_EXITED ? si.si_status : -1;
    st->signal = si.si_code == CLD_EXITED ? 0 : si.si_status;
    st->core = si.si_code == CLD_DUMPED;
    st->utime_ns = (int64_t)ru.ru_utime.tv_sec * 1000000000LL + ru.ru_utime.tv_usec * 1000LL;
    st->stime_ns = (int64_t)ru.ru_stime.tv_sec * 1000000000LL + ru.ru_stime.tv_usec * 1000LL;
    st->maxrss_kb = ru.ru_maxrss;
    return 0;
}

int px_wait(const px_proc *p, int64_t deadline_ns, int cancel_fd, px_capture *out,
            px_capture *err, px_status *st)
{
    int64_t seen = 0;
    int rc = wait_exit(p, deadline_ns, cancel_fd, out, err, &seen);
    if (rc < 0)
        return rc;
    st->exit_seen_ns = seen;
    return reap(p, st);
}

static void signal_tree(const px_proc *p, int sig)
{
    /* The script is its session's and group's leader (SETSID): pgid == pid.  It is
     * unreaped until we reap it, so the pid cannot have been reused. */
    if (kill(-p->pid, sig) < 0)
        sys_pidfd_send_signal(p->pidfd, sig);
}

static void cgroup_kill(int cgroup_fd)
{
    int fd = openat(cgroup_fd, "cgroup.kill", O_WRONLY | O_CLOEXEC); /* kernel 5.14 */
    if (fd < 0)
        return;
    ssize_t w = write(fd, "1", 1);
    (void)w;
    close(fd);
}

/* Wait until the cgroup has no process left: cgroup.events says "populated 0", and the
 * kernel signals each change of that file with POLLPRI (cgroup-v2.rst). */
static void cgroup_wait_empty(int cgroup_fd, int64_t deadline_ns)
{
    char buf[256];
    int fd = openat(cgroup_fd, "cgroup.events", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    for (;;) {
        ssize_t got = pread(fd, buf, sizeof(buf) - 1, 0);
        if (got <= 0)
            break;
        buf[got] = 0;
        if (strstr(buf, "populated 0"))
            break;
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
}

int px_cgroup_kill(int cgroup_fd, int64_t deadline_ns)
{
    cgroup_kill(cgroup_fd);
    cgroup_wait_empty(cgroup_fd, deadline_ns);
    return 0;
}

int px_kill_tree(const px_proc *p, int cgroup_fd, int64_t grace_ns, int64_t kill_wait_ns,
                 px_capture *out, px_capture *err, px_status *st)
{
    int64_t seen = 0;
    signal_tree(p, SIGTERM);
    int rc = wait_exit(p, px_now_ns() + grace_ns, -1, out, err, &seen);
    if (rc < 0 && rc != -ETIMEDOUT)
        return rc;
    /* KILL the group even if the leader went on TERM: descendants that ignore TERM
     * must not outlive it.  The leader is still unreaped, so its pgid is still ours. */
    signal_tree(p, SIGKILL);
    if (cgroup_fd >= 0)
        cgroup_kill(cgroup_fd);
    if (rc == -ETIMEDOUT) {
        /* A process blocked on a frozen filesystem ignores SIGKILL until the thaw:
         * bounded, and the caller never does this inside a freeze window. */
        rc = wait_exit(p, px_now_ns() + kill_wait_ns, -1, out, err, &seen);
        if (rc < 0)
            return rc;
    }
    st->exit_seen_ns = seen;
    rc = reap(p, st);
    if (cgroup_fd >= 0)
        cgroup_wait_empty(cgroup_fd, px_now_ns() + kill_wait_ns);
    return rc;
}
