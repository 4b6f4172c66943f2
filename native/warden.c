/* pyexec-warden: kills the scripts a controller leaves running when it dies.
 *
 * Started once per controller process, before its first script, with the scripts' cgroup
 * parent (<cgroup2>/pyexec) as fd 3, the controller's pid as argv[1] and its life pipe as argv[2]; the controller's own
 * cgroup directory is <pid> under it, made after the warden runs so that no moment leaves it
 * unwatched.  A running script lives in a leaf cgroup named "run-<n>"; when it ends the
 * controller moves what it left running into the sibling "done" and removes the leaf (cgroup v2
 * refuses renames).  The warden leaves "done" alone, since a post-script may have started a
 * daemon on purpose.  The warden sleeps on the controller's pidfd (or life pipe); when the
 * controller is gone it kills every "run-*" cgroup's whole tree, removes the empty leaves and
 * the directory, and exits.  It does the same at the controller's normal exit (then there is
 * no "run-*" left), and at its start for directories of controllers that died unwatched. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PARENT_FD 3
#define KILL_WAIT_NS 5000000000LL

/* Kill what runs in <parent>/<name>/run-*, then remove the empty leaves and the directory. */
static void sweep(const char *name)
{
    int dir = openat(PARENT_FD, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return;
    DIR *d = fdopendir(dup(dir));
    if (d != NULL) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            int running = strncmp(e->d_name, "run-", 4) == 0;
            if (!running && strcmp(e->d_name, "done") != 0)
                continue;
            if (running) {
                int cg = openat(dir, e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                if (cg >= 0) {
                    px_cgroup_kill(cg, px_now_ns() + KILL_WAIT_NS);
                    close(cg);
                }
            }
            unlinkat(dir, e->d_name, AT_REMOVEDIR); /* fails, harmlessly, while a daemon lives there */
        }
        closedir(d);
    }
    close(dir);
    unlinkat(PARENT_FD, name, AT_REMOVEDIR);
}

/* Directories of controllers that died with no warden to clean up after them. */
static void sweep_dead(pid_t self_ctl)
{
    DIR *d = fdopendir(dup(PARENT_FD));
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end != 0 || pid <= 0 || pid == self_ctl)
            continue;
        if (kill((pid_t)pid, 0) < 0 && errno == ESRCH)
            sweep(e->d_name);
    }
    closedir(d);
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    pid_t ctl = (pid_t)atoi(argv[1]);
    int pidfd = px_watch_controller(ctl, atoi(argv[2]));
    sweep_dead(ctl);
    if (pidfd >= 0 && getppid() == ctl) {
        struct pollfd pf = {pidfd, POLLIN, 0};
        while (poll(&pf, 1, -1) < 0 && errno == EINTR)
            ;
    }
    /* The controller is gone, killed or at its normal exit: after a normal exit nothing is
     * "run-*", and "done" is kept while a daemon lives in it. */
    sweep(argv[1]);
    return 0;
}
