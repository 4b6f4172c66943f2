/* pyexec-warden: kills the scripts a controller leaves running when it dies.
 *
 * Started once per controller process, before its first script, with the controller's
 * cgroup directory (<cgroup2>/pyexec/<pid>) as fd 3 and the controller's pid as argv[1].
 * A running script lives in a leaf cgroup named "run-<n>"; when it ends the controller
 * renames it "done-<n>", which the warden leaves alone, since a post-script may have started
 * a daemon on purpose.  The warden sleeps on the controller's pidfd; when the controller is
 * gone it kills every "run-*" cgroup's whole tree, removes the empty leaves and exits.  A
 * controller that exits normally SIGKILLs its warden first. */
#define _GNU_SOURCE
#include "pyexec_core.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define DIR_FD 3
#define KILL_WAIT_NS 5000000000LL

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    pid_t ctl = (pid_t)atoi(argv[1]);
    int pidfd = (int)syscall(SYS_pidfd_open, ctl, 0);
    if (pidfd >= 0 && getppid() == ctl) {
        struct pollfd pf = {pidfd, POLLIN, 0};
        while (poll(&pf, 1, -1) < 0 && errno == EINTR)
            ;
    }
    DIR *d = fdopendir(dup(DIR_FD));
    if (d == NULL)
        return 1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int running = strncmp(e->d_name, "run-", 4) == 0;
        if (!running && strncmp(e->d_name, "done-", 5) != 0)
            continue;
        if (running) {
            int cg = openat(DIR_FD, e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (cg >= 0) {
                px_cgroup_kill(cg, px_now_ns() + KILL_WAIT_NS);
                close(cg);
            }
        }
        unlinkat(DIR_FD, e->d_name, AT_REMOVEDIR); /* fails, harmlessly, while a daemon lives there */
    }
    closedir(d);
    /* The controller's own directory goes too once it is empty. */
    char path[4096];
    ssize_t n = readlink("/proc/self/fd/3", path, sizeof(path) - 1);
    if (n > 0) {
        path[n] = 0;
        rmdir(path);
    }
    return 0;
}
