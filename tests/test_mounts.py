"""Mount discovery on recorded /proc/self/mountinfo texts (tests/mountinfo/), and once on this
machine's real mountinfo with loop images the test made: which filesystems, once each, in what order.
Nothing here freezes anything."""
from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
from helpers import Mounts, needs_btrfs, needs_root

from pyexec import mounts as discovery

RECORDED = pathlib.Path(__file__).parent / "mountinfo"

# Loop devices of loop-stack.txt and the files behind them (sysfs is this machine's, not the recording's).
LOOP_BACKING = {"/dev/loop0": "/srv/images/disk.img", "/dev/loop1": "/srv/images/data.img",
                "/dev/loop2": "/data/inner.img", "/dev/loop3": "/data/zdb.img"}

CASES = {
    # bind mount of /datadrive deduplicated; vfat, squashfs, tmpfs left out; / last
    "azure-ubuntu.txt": ["/datadrive", "/mnt", "/"],
    # nested LVM volumes: /var/log before /var; an escaped space in a mount point; nfs4 left out
    "rhel-lvm-xfs.txt": ["/opt/oracle data", "/var/log", "/boot", "/home", "/var", "/"],
    # four subvolumes of one btrfs are one superblock, frozen once through /
    "btrfs-subvolumes.txt": ["/srv/backup", "/"],
    # loop images before the filesystems holding their backing files, wherever they are mounted
    "loop-stack.txt": ["/srv/vm/disk", "/data/inner", "/zdb", "/data", "/srv", "/"],
    # a bind into a pod dir is deduplicated; the ext4 hidden under /scratch cannot be reached; ext2 left out
    "containers-overmount.txt": ["/var/lib/docker", "/scratch", "/"],
}


def select_recorded(name: str, **kw) -> list[discovery.Mount]:
    text = (RECORDED / name).read_text()
    return discovery.select(discovery.parse_mountinfo(text), backing=LOOP_BACKING.get, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_mountinfo_selection_and_order(name):
    assert [m.mount_point for m in select_recorded(name)] == CASES[name]


def test_recording_set_is_complete():
    assert sorted(p.name for p in RECORDED.glob("*.txt")) == sorted(CASES)


def test_loop_images_precede_their_backing_filesystem():
    chosen = select_recorded("loop-stack.txt")
    pos = {m.mount_point: i for i, m in enumerate(chosen)}
    for m in chosen:
        backing = LOOP_BACKING.get(m.source)
        if backing:
            host = max((h for h in chosen if discovery._contains(h.mount_point, backing)),
                       key=lambda h: len(h.mount_point))
            assert pos[m.mount_point] < pos[host.mount_point], f"{m.mount_point} must freeze before {host}"


def test_subvolumes_are_one_superblock():
    # The recording mounts four subvolumes of one btrfs (one st_dev, four roots) and a second btrfs.
    parsed = discovery.parse_mountinfo((RECORDED / "btrfs-subvolumes.txt").read_text())
    subvolumes = [m for m in parsed if m.dev == "0:24"]
    assert sorted(m.root for m in subvolumes) == ["/@", "/@home", "/@log", "/@snapshots"]
    chosen = select_recorded("btrfs-subvolumes.txt")
    # Those four become one freeze, through the subvolume mounted at /; the other btrfs is its own.
    assert [(m.mount_point, m.dev, m.fstype) for m in chosen] == [("/srv/backup", "0:38", "btrfs"),
                                                                 ("/", "0:24", "btrfs")]


@pytest.mark.parametrize("skip,expect", [
    (["/"], ["/datadrive", "/mnt"]),
    (["/mnt/", "/datadrive"], ["/"]),
    (["/var/lib/mysql"], ["/mnt", "/"]),  # skipping a bind skips its superblock, reached through /datadrive too
    (["/not/mounted"], ["/datadrive", "/mnt", "/"]),
])
def test_mounts_to_skip(skip, expect):
    assert [m.mount_point for m in select_recorded("azure-ubuntu.txt", skip=skip)] == expect


def test_parse_keeps_every_field():
    ms = discovery.parse_mountinfo((RECORDED / "rhel-lvm-xfs.txt").read_text())
    oracle = next(m for m in ms if m.fstype == "ext3")
    assert oracle == discovery.Mount("/opt/oracle data", "ext3", "253:4", "/dev/mapper/datavg-oralv", "/")
    assert len(ms) == 13


@pytest.mark.parametrize("text", ["", "garbage\n", "1 2 3\n", "36 35 98:0 /mnt1 /mnt2 rw - \n",
                                  "36 35 98:0 / /x rw - ext4\n"])
def test_malformed_lines_are_ignored(text):
    assert discovery.select(discovery.parse_mountinfo(text)) == []


@needs_btrfs
def test_discover_this_machine_finds_a_loop_stack_in_order(mounts):
    """Read-only: the real mountinfo and sysfs, with an ext4 image stored inside a btrfs image."""
    outer = mounts.make("btrfs")
    inner = mounts.make("ext4", image_dir=outer.mountpoint)
    found = [m.mount_point for m in discovery.discover()]
    assert outer.mountpoint in found and inner.mountpoint in found
    assert found.index(inner.mountpoint) < found.index(outer.mountpoint)
    assert found[-1] == "/" or "/" not in found
    skipped = [m.mount_point for m in discovery.discover(skip=[inner.mountpoint])]
    assert inner.mountpoint not in skipped and outer.mountpoint in skipped


def test_discover_reads_the_given_file(tmp_path):
    p = tmp_path / "mi"
    p.write_text((RECORDED / "azure-ubuntu.txt").read_text())
    assert [m.mount_point for m in discovery.discover(path=str(p))] == CASES["azure-ubuntu.txt"]


def test_mount_limit_is_the_native_one(nat):
    assert discovery.MAX_MOUNTS == nat.max_mounts


def test_plan_refuses_what_cannot_be_frozen_before_anything_runs(tmp_path):
    from pyexec import errors
    with pytest.raises(errors.FreezeNotSupported) as ei:
        discovery.plan(["/proc"])
    assert ei.value.code == 121 and "proc" in ei.value.detail
    with pytest.raises(errors.FreezeError) as ei:
        discovery.plan([str(tmp_path / "missing")])
    assert ei.value.code == 123


@needs_root
def test_the_mounts_fixture_detaches_whatever_its_teardown_meets(tmp_path):
    """The fixture every freezing test relies on: a writer that cannot be stopped (here, one whose kill
    fails) must not leave its loop mounts mounted and attached; the error still surfaces."""
    box = Mounts(tmp_path)
    fs = box.make("ext4")
    device, mountpoint = fs.device, fs.mountpoint

    class Unkillable:
        def kill(self):
            raise ProcessLookupError("no such process")

        def wait(self, timeout=None):
            return 0

    box.writers.append(Unkillable())
    with pytest.raises(ProcessLookupError):
        box.close()
    assert not os.path.ismount(mountpoint)
    attached = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert f"{device}:" not in attached, attached
