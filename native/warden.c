/* pyexec-warden: kills the scripts a controller leaves running when it dies, and removes the
 * controller's cgroup directories once its guardians are gone.
 *
 * Started once per controller process, before its first script and its first guardian, with the
 * controller's pid as argv[1], its life pipe as argv[2], and pyexec's directory (<mount>/pyexec)
 * in each cgroup hierarchy it uses as argv[3...]: the scripts' (cgroup v2, else the v1 freezer)
 * and those a kill of the caller's cgroup can come through (the v1 freezer, name=systemd).  The
 * warden lives in those directories (px_spawn_helper puts it there before it runs); the
 * controller's directory in each is <pid>, made after the warden runs so that no moment leaves it
 * unwatched, and its leaf "guard" holds the controller's thaw guardians.  Neither is in the
 * caller's cgroup: a kill of that cgroup (cgroup.kill, systemd's kill of a unit, an OOM group
 * kill, a v1 freezer-based kill) does not reach them, and its freeze does not stop them.
 * A running script lives in a leaf cgroup named "run-<n>"; when it ends the controller moves what
 * it left running into the sibling "done" and removes the leaf (cgroup v2 refuses renames).  The
 * warden leaves "done" alone, since a post-script may have started a daemon on purpose.  The
 * warden sleeps on the controller's pidfd (or life pipe); when the controller is gone (killed, or
 * at its normal exit, when no "run-*" is left) it kills every "run-*" cgroup's whole tree, waits
 * (bounded) for the guardians to thaw and leave "guard", removes the empty leaves and the
 * directory, and exits.  At its start it sweeps the directories of controllers that died
 * unwatched. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A guardian whose controller died thaws at once and exits; past this the directory is left to
 * the next warden's sweep of dead controllers. */
#define GUARDIANS_WAIT_NS 10000000000LL

/* Kill what runs in <parent>/<name>/run-*, then remove the empty leaves and the directory. */
static void sweep(int parent, const char *name)
{
    int dir = openat(parent, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return;
    DIR *d = fdopendir(dup(dir));
    if (d != NULL) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            int running = strncmp(e->d_name, "run-", 4) == 0;
            if (!running && strcmp(e->d_name, "done") != 0 && strcmp(e->d_name, PX_GUARD_LEAF) != 0)
                continue;
            if (running) {
                int cg = openat(dir, e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                int rc = 0;
                if (cg >= 0) {
                    rc = px_cgroup_kill(cg, px_now_ns() + PX_KILL_WAIT_NS);
                    close(cg);
                }
                /* Still populated at the deadline: its rmdir would fail (EBUSY).  It is left to
                 * the sweep after the guardians' wait, or to the next warden's sweep. */
                if (rc == -ETIMEDOUT)
                    continue;
            }
            /* fails, harmlessly, while a daemon lives in "done" or a guardian in "guard" */
            unlinkat(dir, e->d_name, AT_REMOVEDIR);
        }
        closedir(d);
    }
    close(dir);
    unlinkat(parent, name, AT_REMOVEDIR);
}

/* Directories of controllers that died with no warden to clean up after them. */
static void sweep_dead(int parent, pid_t self_ctl)
{
    DIR *d = fdopendir(dup(parent));
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end != 0 || pid <= 0 || pid == self_ctl)
            continue;
        if (kill((pid_t)pid, 0) < 0 && errno == ESRCH)
            sweep(parent, e->d_name);
    }
    closedir(d);
}

/* Wait until <parent>/<name>/guard is empty (its guardians have thawed and gone): 1 if it was
 * there to wait for, 0 if it is gone already. */
static int wait_guardians(int parent, const char *name, int64_t deadline_ns)
{
    char path[64];
    snprintf(path, sizeof(path), "%s/" PX_GUARD_LEAF, name);
    int fd = openat(parent, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    px_cgroup_wait_empty(fd, deadline_ns);
    close(fd);
    return 1;
}

int main(int argc, char **argv)
{
    int parents[PX_MAX_CGROUPS], n = 0;
    if (argc < 4 || argc - 3 > PX_MAX_CGROUPS)
        return 2;
    pid_t ctl = (pid_t)atoi(argv[1]);
    int32_t pidfd;
    int watched = px_watch_parent(ctl, atoi(argv[2]), 0, &pidfd) == 0;
    for (int i = 3; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0)
            parents[n++] = fd;
    }
    for (int i = 0; i < n; i++)
        sweep_dead(parents[i], ctl);
    if (watched) {
        struct pollfd pf = {pidfd, POLLIN, 0};
        while (poll(&pf, 1, -1) < 0 && errno == EINTR)
            ;
    }
    /* The controller is gone, killed or at its normal exit.  After a normal exit nothing is
     * "run-*", and "done" is kept while a daemon lives in it. */
    for (int i = 0; i < n; i++)
        sweep(parents[i], argv[1]);
    int64_t deadline = px_now_ns() + GUARDIANS_WAIT_NS;
    for (int i = 0; i < n; i++)
        if (wait_guardians(parents[i], argv[1], deadline))
            sweep(parents[i], argv[1]);
    return 0;
}
