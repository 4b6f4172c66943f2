/* Kernel features, probed once per process and cached; each one has an event-driven fallback
 * (pyexec_core.h names it beside the field).  pyexec/kernel.py reads the result for Python.
 *
 * A syscall probe calls the syscall in a way that cannot do anything (a bad fd, an empty range,
 * an open of "/") and reads the answer: ENOSYS (or EINVAL/E2BIG for a flag or a struct size the
 * kernel does not know) means absent.  A cgroup probe reads mountinfo for the hierarchy, and looks
 * for the cgroup v2 file in a directory that is no root cgroup (the root has neither cgroup.kill
 * nor cgroup.freeze, whatever the kernel).
 *
 * PYEXEC_DISABLE, a comma-separated list of pidfd_open, waitid_pidfd, clone3_cgroup, close_range,
 * openat2, cgroup2, cgroup_v1, cgroup_kill and cgroup_freeze, makes a probe report its feature
 * absent whatever the kernel has: how tests/kernel_profile.py hides what a seccomp filter cannot (a
 * file, a mount), and how an admin keeps pyexec off a feature.  It is read here and nowhere else. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
#ifndef SYS_openat2
#define SYS_openat2 437 /* one number on every architecture (the unified table of 5.6) */
#endif
#define RESOLVE_NO_MAGICLINKS_ 0x02 /* linux/openat2.h, which glibc 2.28's kernel headers lack */
#define RESOLVE_NO_SYMLINKS_ 0x04

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

/* Whether mountinfo (proc(5)) has an entry of this filesystem type; the first one's mount point in
 * out (if not NULL), as pyexec/kernel.py takes it. */
static int mount_of(const char *fstype, char *out)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    while (f && !found && getline(&line, &cap, f) > 0) {
        const char *sep = strstr(line, " - ");
        char type[64];
        if (sep && sscanf(sep + 3, "%63s", type) == 1 && strcmp(type, fstype) == 0)
            found = !out || sscanf(line, "%*s %*s %*s %*s %4095s", out) == 1;
    }
    free(line);
    if (f)
        fclose(f);
    return found;
}

/* This process's cgroup v2 path ("0::/path" in /proc/self/cgroup), relative to its mount; 0 if none. */
static int own_cgroup2(char *out)
{
    FILE *f = fopen("/proc/self/cgroup", "re");
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    while (f && !found && getline(&line, &cap, f) > 0)
        if (strncmp(line, "0::/", 4) == 0)
            found = sscanf(line + 4, "%4095s", out) == 1; /* "0::/" alone: the root, none */
    free(line);
    if (f)
        fclose(f);
    return found;
}

/* An open directory of the cgroup v2 mount at root that is no root cgroup, or -1.  cgroup.events
 * is in every cgroup but the root (4.5, cgroup v2 itself).  Tried in turn: the mount's own top
 * (a root only outside a cgroup namespace), this process's cgroup, and pyexec's directory in the
 * hierarchy (pyexec/cgroups.py keeps its warden there; made here if absent, as that would). */
static int nonroot_cgroup2(const char *root)
{
    char rel[PATH_MAX];
    int top = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (top < 0)
        return -1;
    if (faccessat(top, "cgroup.events", F_OK, 0) == 0)
        return top;
    int fd = -1;
    if (own_cgroup2(rel))
        fd = openat(top, rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || faccessat(fd, "cgroup.events", F_OK, 0) != 0) {
        if (fd >= 0)
            close(fd);
        mkdirat(top, "pyexec", 0755); /* EEXIST, or no right to: then the open says */
        fd = openat(top, "pyexec", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0 && faccessat(fd, "cgroup.events", F_OK, 0) != 0) {
            close(fd);
            fd = -1;
        }
    }
    close(top);
    return fd;
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
    /* openat2 with RESOLVE_NO_SYMLINKS: kernel 5.6; "/" opened as pyexec/identity.py opens a mount
     * point (struct open_how: flags, mode, resolve). */
    uint64_t how[3] = {O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS_ | RESOLVE_NO_MAGICLINKS_};
    fd = (int)syscall(SYS_openat2, AT_FDCWD, "/", how, sizeof(how));
    if (fd >= 0)
        close(fd);
    f->openat2 = fd >= 0 && !disabled("openat2");
    /* cgroup v2: kernel 4.5, where it is mounted; cgroup v1 (2.6.24), any of its hierarchies. */
    char root[PATH_MAX];
    f->cgroup2 = mount_of("cgroup2", root) && !disabled("cgroup2");
    f->cgroup_v1 = mount_of("cgroup", NULL) && !disabled("cgroup_v1");
    /* cgroup.freeze: kernel 5.2; cgroup.kill: kernel 5.14.  Files of every non-root cgroup v2
     * directory, so one such directory tells; without cgroup v2 neither is of use. */
    f->cgroup_freeze = f->cgroup_kill = 0;
    if (f->cgroup2 && (fd = nonroot_cgroup2(root)) >= 0) {
        f->cgroup_freeze = faccessat(fd, "cgroup.freeze", F_OK, 0) == 0 && !disabled("cgroup_freeze");
        f->cgroup_kill = faccessat(fd, "cgroup.kill", F_OK, 0) == 0 && !disabled("cgroup_kill");
        close(fd);
    }
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
