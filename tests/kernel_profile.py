"""Run a command as if on an older kernel: a seccomp filter answers pyexec's newer syscalls as that
kernel does, and PYEXEC_DISABLE hides the cgroup files a filter cannot.

    python tests/kernel_profile.py PROFILE -- COMMAND...

Profiles (what each answers differently from this machine's kernel):
  4.18    RHEL/Alma/Rocky 8: no pidfd_open, pidfd_send_signal, clone3, close_range or openat2 (ENOSYS),
          waitid(P_PIDFD) EINVAL; no cgroup.kill or cgroup.freeze
  5.4     Ubuntu 20.04: no close_range or openat2 (ENOSYS); clone3 without CLONE_INTO_CGROUP (ENOSYS here: glibc
          falls back from ENOSYS only, and pyexec's probe takes the same fallback for E2BIG); no
          cgroup.kill
  5.7     no close_range (ENOSYS); no cgroup.kill
  4.18-v1 4.18 with cgroup v2 hidden: RHEL 8 as it boots by default (cgroup v1 only)
  v1      this kernel, cgroup v2 hidden (a cgroup-v1-only machine: the v1 freezer hierarchy)
  nocgroup this kernel with no usable cgroup at all
  native  this kernel as it is
The filter is inherited by every child, so a whole pytest run sees one kernel."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
NR = {"waitid": 247, "pidfd_send_signal": 424, "pidfd_open": 434, "clone3": 435, "close_range": 436,
      "openat2": 437}
P_PIDFD = 3
AUDIT_ARCH_X86_64 = 0xC000003E
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
LD_ABS_W, JEQ_K, RET_K = 0x20, 0x15, 0x06
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16

PROFILES = {
    "4.18": ({"pidfd_open": errno.ENOSYS, "pidfd_send_signal": errno.ENOSYS, "clone3": errno.ENOSYS,
              "close_range": errno.ENOSYS, "openat2": errno.ENOSYS, "waitid": ("arg0", P_PIDFD, errno.EINVAL)},
             "cgroup_kill,cgroup_freeze"),
    "5.4": ({"clone3": errno.ENOSYS, "close_range": errno.ENOSYS, "openat2": errno.ENOSYS}, "cgroup_kill"),
    "5.7": ({"close_range": errno.ENOSYS}, "cgroup_kill"),
    "4.18-v1": ({"pidfd_open": errno.ENOSYS, "pidfd_send_signal": errno.ENOSYS, "clone3": errno.ENOSYS,
                 "close_range": errno.ENOSYS, "openat2": errno.ENOSYS, "waitid": ("arg0", P_PIDFD, errno.EINVAL)},
                "cgroup_kill,cgroup_freeze,cgroup2"),
    "v1": ({}, "cgroup2"),
    "nocgroup": ({}, "cgroup2,cgroup_v1"),
    "native": ({}, ""),
}
# Each feature pyexec's probe reports (native/pyexec_core.h's px_features), and what a profile takes
# it away with: a syscall its filter answers, or a name in PYEXEC_DISABLE.  What a profile leaves,
# the probe must report as the kernel has it (tests/test_kernel_profiles.py checks the kernel itself).
TAKEN_BY = {
    "pidfd_open": ({"pidfd_open"}, {"pidfd_open"}),
    "waitid_pidfd": ({"waitid", "pidfd_open"}, {"waitid_pidfd", "pidfd_open"}),  # asked with a pidfd
    "clone3_cgroup": ({"clone3"}, {"clone3_cgroup"}),
    "close_range_cloexec": ({"close_range"}, {"close_range"}),
    "openat2": ({"openat2"}, {"openat2"}),
    "cgroup2": (set(), {"cgroup2"}),
    "cgroup_v1": (set(), {"cgroup_v1"}),
    "cgroup_kill": (set(), {"cgroup_kill", "cgroup2"}),  # a cgroup v2 file: of no use without v2
    "cgroup_freeze": (set(), {"cgroup_freeze", "cgroup2"}),
}


def allows(profile: str, inherited: str = "") -> dict[str, bool]:
    """For each feature, whether the profile leaves it to the kernel (True) or takes it away; inherited:
    a PYEXEC_DISABLE the profile adds to (main() keeps the caller's)."""
    rules, disable = PROFILES[profile]
    names = set(f"{inherited},{disable}".split(","))
    return {f: not (syscalls & rules.keys() or switches & names) for f, (syscalls, switches) in TAKEN_BY.items()}


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(rules: dict) -> bytes:
    """A seccomp BPF program: each rule's syscall answers its errno; everything else runs."""
    prog = [_ins(LD_ABS_W, OFF_ARCH), _ins(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), _ins(RET_K, RET_ALLOW)]
    for name, answer in rules.items():
        prog.append(_ins(LD_ABS_W, OFF_NR))
        if isinstance(answer, tuple):  # only when the first argument has this value
            _, value, err = answer
            prog += [_ins(JEQ_K, NR[name], 0, 3), _ins(LD_ABS_W, OFF_ARG0), _ins(JEQ_K, value, 0, 1),
                     _ins(RET_K, RET_ERRNO | err)]
        else:
            prog += [_ins(JEQ_K, NR[name], 0, 1), _ins(RET_K, RET_ERRNO | answer)]
    prog.append(_ins(RET_K, RET_ALLOW))
    return b"".join(prog)


def install(rules: dict) -> None:
    """Install the filter on this process (and so on everything it starts from now on)."""
    if not rules:
        return
    if platform.machine() != "x86_64":
        raise SystemExit("kernel_profile: the filter knows x86_64 syscall numbers only")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    code = program(rules)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--" or argv[0] not in PROFILES:
        raise SystemExit(__doc__)
    rules, disable = PROFILES[argv[0]]
    install(rules)
    env = dict(os.environ)
    if disable:
        env["PYEXEC_DISABLE"] = ",".join(filter(None, [env.get("PYEXEC_DISABLE", ""), disable]))
    env["PYEXEC_KERNEL_PROFILE"] = argv[0]
    os.execvpe(argv[2], argv[2:], env)


if __name__ == "__main__":
    main(sys.argv[1:])
