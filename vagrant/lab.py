"""The qemu lab runner: build (or reuse) the lab image, boot it with scratch disks for LVM
and ZFS, run the lab tests (or the lab benchmark) on the project's tree inside, bring the
output back, and exit with the guest command's status. A test may ask for the guest to be
restarted once: it is booted again on the same disks and runs the test's second part.
Vagrant users get the same guest from provision.sh; this is what CI uses.

    python vagrant/lab.py [--timeout SECONDS] [--rebuild] test [PYTEST_ARGS...]
    python vagrant/lab.py [--timeout SECONDS] [--rebuild] bench [BENCH_ARGS...]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from snapmgr import sh

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = REPO / "build" / "lab"
# Everything the image is built from: a change to any of them builds a new image.
IMAGE_INPUTS = ("provision.sh", "build-image.sh", "snapmgr-lab.service")
# Scratch disks the guest sees as /dev/disk/by-id/virtio-<serial>, fresh on every run.
SCRATCH_DISKS = {"snapmgr-lvm": 4 << 30, "snapmgr-zfs": 2 << 30}
# By label: qemu numbers virtio disks in an order of its own. panic=1 with -no-reboot
# ends qemu when the guest cannot boot, instead of waiting at a rescue shell.
KERNEL_ARGS = "root=LABEL=snapmgr-lab rw console=ttyS0 panic=1 quiet loglevel=3 systemd.show_status=0 snapmgr.lab"
BUILD_TIMEOUT = 40 * 60
KVM_PROBE_TIMEOUT = 30
GUEST_RESULTS = "/mnt/results"   # where snapmgr-lab.service mounts the results share
ROOT_OVERLAY = "root.qcow2"
# Left in the results share by a test that needs the guest restarted (tests/lab/test_reboot.py):
# the command the guest runs after the reboot. lab-guest.sh knows the same name.
REBOOT_REQUEST = "after-reboot"
BEFORE_REBOOT = "status-before-reboot"   # the first part's status, written before the reboot


def guest_command(job: str, args: list[str]) -> list[str]:
    if job == "bench":
        return ["python3", "bench/lab_bench.py", *args]
    # Options alone (-x, -k ...) still run the lab tier; naming test paths picks them instead.
    paths = [] if any(a.startswith("tests/") for a in args) else ["tests/lab"]
    return ["python3", "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={GUEST_RESULTS}/junit.xml",
            *paths, *args]


def say(message: str) -> None:
    print(f"lab: {message}", flush=True)


class Image:
    """The cached boot files, in a directory named by the hash of their inputs."""

    def __init__(self, cache: Path):
        digest = hashlib.sha256()
        for name in IMAGE_INPUTS:
            digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
        self.cache = cache
        self.dir = cache / digest.hexdigest()[:16]

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"

    def ensure(self, rebuild: bool, timeout: float) -> float:
        """Build unless cached; return the seconds spent building. Runs that start
        together wait for one build instead of racing in the same directory."""
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._build_unless_cached(rebuild, timeout)

    def _build_unless_cached(self, rebuild: bool, timeout: float) -> float:
        if self.rootfs.exists() and not rebuild:
            say(f"image {self.dir} (cached)")
            return 0.0
        say(f"building the image into {self.dir} (about 6 minutes; later runs reuse it)")
        started = time.monotonic()
        partial = self.dir.with_suffix(".partial")
        remove_tree(partial)
        # snapmgr's own Python has pip, configured for this machine's package index.
        sh.run(["bash", HERE / "build-image.sh", partial, sys.executable], capture=False, timeout=timeout)
        # Only a complete image is ever published under its name; older images go.
        for old in self.cache.iterdir():
            if old.is_dir() and old != partial:
                remove_tree(old)
        partial.rename(self.dir)
        return time.monotonic() - started


def remove_tree(path: Path) -> None:
    """rmtree, after unmounting what a killed build left mounted in its chroot: with the
    host's /dev bound inside, rmtree would delete the host's device nodes."""
    with open("/proc/self/mounts") as table:
        mounted = [Path(line.split()[1]) for line in table]
    for mountpoint in sorted((m for m in mounted if m.is_relative_to(path)), key=lambda m: -len(m.parts)):
        sh.run(["umount", "--lazy", mountpoint], timeout=60)
    shutil.rmtree(path, ignore_errors=True)


def qemu_argv(image: Image, accel: str, scratch: Path, results: Path) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", "2", "-m", "2048", "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_ARGS,
        "-drive", f"file={scratch / ROOT_OVERLAY},if=none,id=root,format=qcow2",
        "-device", "virtio-blk-pci,drive=root",
        "-virtfs", f"local,path={REPO},mount_tag=project,security_model=none,readonly=on",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
    ]
    for serial in SCRATCH_DISKS:
        argv += ["-drive", f"file={scratch / serial}.img,if=none,id={serial},format=raw",
                 "-device", f"virtio-blk-pci,drive={serial},serial={serial}"]
    return argv


def kvm_boots(image: Image) -> bool:
    """Whether a KVM guest gets as far as running its kernel: /dev/kvm can open on hosts
    where guests never boot (nested under another hypervisor), so try the real kernel."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    # No root device: the kernel panics at once, and panic=-1 with -no-reboot ends qemu.
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "512", "-nographic",
            "-no-reboot", "-nic", "none", "-kernel", str(image.kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]
    try:
        done = sh.run(argv, timeout=KVM_PROBE_TIMEOUT, check=False)
    except sh.CommandError:
        return False
    return "Kernel panic" in done.stdout


def accelerator(image: Image) -> str:
    wanted = os.environ.get("SNAPMGR_LAB_ACCEL", "auto")
    if wanted in ("kvm", "tcg"):
        return wanted
    return "kvm" if kvm_boots(image) else "tcg"


def boot(image: Image, accel: str, results: Path, timeout: float) -> None:
    """Boot the guest; once more, on the same disks, when its tests asked for a reboot."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="snapmgr-lab-") as scratch:
        scratch = Path(scratch)
        # The guest writes to an overlay of its own: the cached image stays clean, and a
        # second boot finds what the first wrote.
        sh.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image.rootfs.resolve(),
                scratch / ROOT_OVERLAY],
               timeout=60)
        for serial, size in SCRATCH_DISKS.items():
            with open(scratch / f"{serial}.img", "wb") as disk:
                disk.truncate(size)
        argv = qemu_argv(image, accel, scratch, results)
        run_guest(argv, results / "console.log", deadline - time.monotonic())
        # Only once the first part has ended: a guest that died on its way gets no second boot.
        if (results / REBOOT_REQUEST).exists() and (results / BEFORE_REBOOT).exists():
            say("a test asked for a reboot: booting the guest again on the same disks")
            run_guest(argv, results / "console.log", deadline - time.monotonic(), append=True)


def run_guest(argv: list[str], console_log: Path, timeout: float, append: bool = False) -> None:
    """Run qemu, echoing the guest's console and keeping a copy; past the timeout qemu is
    killed (sh.run kills its whole process group) and CommandTimeout raised."""
    with open(console_log, "a" if append else "w") as console:
        def show(line: str) -> None:
            console.write(line + "\n")
            print(f"  {line}", flush=True)
        sh.run(argv, timeout=timeout, on_stdout=show)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=50 * 60,
                        help="hard limit in seconds for build, boot and tests together")
    parser.add_argument("--rebuild", action="store_true", help="build the image even if cached")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("SNAPMGR_LAB_CACHE", "/var/cache/snapmgr-lab")))
    parser.add_argument("job", choices=("test", "bench"),
                        help="test: pytest in the guest (default tests/lab); bench: bench/lab_bench.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to pytest or to the benchmark")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout

    image = Image(args.cache)
    try:
        built = image.ensure(args.rebuild, min(BUILD_TIMEOUT, args.timeout))
        accel = accelerator(image)
        shutil.rmtree(RESULTS, ignore_errors=True)
        RESULTS.mkdir(parents=True)
        (RESULTS / "command").write_text("\n".join(guest_command(args.job, args.args)) + "\n")
        say(f"booting the guest ({accel}); it runs the {args.job} job and powers off")
        started = time.monotonic()
        boot(image, accel, RESULTS, deadline - started)
    except sh.CommandTimeout as e:
        say(f"gave up: {e.argv[0]} ran past the {args.timeout:g}s limit and was killed")
        return 1
    except sh.CommandError as e:
        say(f"failed: {e}")
        return 1
    guest = time.monotonic() - started
    status = RESULTS / "status"
    if not status.exists():
        say(f"the guest stopped without finishing its job; its console is in {RESULTS / 'console.log'}")
        return 1
    code = int(status.read_text())
    say(f"{args.job} exited {code}; build {built:.0f}s, guest {guest:.0f}s; output in {RESULTS}")
    return code


if __name__ == "__main__":
    sys.exit(main())
