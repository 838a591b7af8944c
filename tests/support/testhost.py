"""Fresh Debian 12 hosts with real systemd on this machine, reached over SSH like a VM.

debootstrap builds one minimal root filesystem (cached); each host is a copy of it booted
with systemd-nspawn, sharing the machine's network, its sshd on its own loopback port, with
its own host key (written to a known_hosts file) and root key. Recipe: docs/facts.md,
"systemd-nspawn test hosts".

As a cloud image has, each host also has an unprivileged user (`admin`) with passwordless
sudo and an SSH key of its own: the deploy can reach it as prod.py reaches a cloud VM
(`ssh_user` + `_sudo`). A host that reboots is started again, as a hypervisor restarts a
VM: systemd-nspawn exits with code 133 on a reboot and a supervising loop boots it again,
in a time namespace whose boot clock starts at zero, so that /proc/uptime (pyinfra's
reboot operation compares it) reads as the container's own uptime. docs/drills.md.

  python -m tests.support.testhost create NAME --ssh-port 2222
  python -m tests.support.testhost destroy NAME
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LLAMAHOST_CACHE", REPO / ".cache"))
MIRROR = os.environ.get("LLAMAHOST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "systemd,systemd-sysv,dbus,openssh-server,python3,ca-certificates,sudo"
# The login a cloud image gives (Debian's images: `admin`, Ubuntu's: `ubuntu`).
SUDO_USER = "admin"
# systemd-nspawn's exit status when the container rebooted.
REBOOT_EXIT = 133
# Runs systemd-nspawn ("$@") until it exits with anything but REBOOT_EXIT. Each boot gets
# a fresh time namespace whose CLOCK_BOOTTIME (so /proc/uptime) starts near zero, as a
# VM's does; the machine's uptime would otherwise show through. destroy() kills the loop
# and systemd-nspawn together: they are one process group.
SUPERVISE = f"""
while :; do
  if [ "$TESTHOST_TIMENS" = 1 ]; then
    up=$(cut -d. -f1 /proc/uptime)
    unshare --time --fork --boottime=-$((up > 1 ? up - 1 : 0)) -- "$@"
  else
    "$@"
  fi
  rc=$?
  [ "$rc" -eq {REBOOT_EXIT} ] || exit "$rc"
  echo "[testhost] $(date -u +%FT%TZ) the host rebooted (exit {REBOOT_EXIT}): starting it again"
done
"""


@dataclass
class TestHost:
    name: str
    ssh_port: int
    key: str
    known_hosts: str
    pid: int  # the supervising loop's, leader of the process group with systemd-nspawn
    # The cloud-image login: unprivileged, passwordless sudo, its own key.
    user: str = SUDO_USER
    user_key: str = ""

    @property
    def dir(self) -> Path:
        return CACHE / "hosts" / self.name

    def ssh_argv(self, command: str, user: str = "root") -> list[str]:
        return [
            "ssh",
            "-p",
            str(self.ssh_port),
            "-i",
            self.key if user == "root" else self.user_key,
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            f"{user}@127.0.0.1",
            command,
        ]

    def run(
        self, command: str, check: bool = True, timeout: float = 600, user: str = "root"
    ) -> subprocess.CompletedProcess[str]:
        """``command`` over SSH as root, or as ``user`` (the sudo user) with its own key."""
        return subprocess.run(
            self.ssh_argv(command, user),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def boot_id(self) -> str:
        """This boot's id: systemd-nspawn gives every boot of the container a new one."""
        return self.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def wait_up(self, timeout: float = 120) -> None:
        """Until systemd reports the boot finished (running or degraded) over SSH."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name}: systemd-nspawn is gone; see {self.dir}/console.log"
                )
            try:
                r = self.run("systemctl is-system-running --wait", check=False, timeout=60)
                if r.stdout.strip() in ("running", "degraded"):
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not up after {timeout}s; see console.log")
            time.sleep(1)

    def alive(self) -> bool:
        """Whether the supervising loop runs (an exited one not yet reaped counts as gone)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"


def _log(msg: str) -> None:
    print(f"[testhost] {msg}", file=sys.stderr, flush=True)


def unmount_below(path: Path) -> None:
    """Unmount what an interrupted debootstrap left mounted (its /proc) before deleting."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def base_rootfs() -> Path:
    """The cached debootstrap tree; built once (about a minute)."""
    root = CACHE / "rootfs" / "bookworm"
    if (root / "etc" / "debian_version").exists():
        return root
    tmp = root.with_name("bookworm.partial")
    if tmp.exists():
        unmount_below(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _log(f"debootstrap bookworm from {MIRROR}")
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(tmp), MIRROR],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # Every host gets its own host keys and machine id.
    for key in (tmp / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (tmp / "etc" / "machine-id").write_text("")
    tmp.rename(root)
    return root


_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def trust_local_cas(rootfs: Path) -> None:
    """Trust the certificate authorities this machine trusts beyond Debian's list.

    A VM in this machine's network would be given them too (this network inspects TLS to
    the package registries). They go to /usr/local/share/ca-certificates, which survives
    update-ca-certificates runs, and into the current bundle.
    """
    if not SYSTEM_BUNDLE.exists():
        return
    bundle = rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    known = set(_PEM.findall(bundle.read_text())) if bundle.exists() else set()
    extra = [c for c in _PEM.findall(SYSTEM_BUNDLE.read_text()) if c not in known]
    local = rootfs / "usr" / "local" / "share" / "ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    for i, cert in enumerate(extra):
        (local / f"build-machine-{i}.crt").write_text(cert + "\n")
    if extra:
        with bundle.open("a") as f:
            f.write("".join(c + "\n" for c in extra))


def time_namespaces() -> bool:
    """Whether this machine can give a host a boot clock of its own (Linux 5.6+)."""
    probe = ["unshare", "--time", "--fork", "--boottime=-1", "--", "true"]
    try:
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0
    except OSError:
        return False


def add_sudo_user(th: TestHost, public_key: str) -> None:
    """The cloud image's login: a user of its own group, its home 0750 (as on Ubuntu's
    cloud images; Debian's useradd would make it 0755), passwordless sudo for everything
    (cloud-init's own sudoers line), its key in ~/.ssh, no password."""
    u = th.user
    th.run(
        f"useradd -m -s /bin/bash -U {u} && chmod 0750 /home/{u}"
        f" && install -d -m 0700 -o {u} -g {u} /home/{u}/.ssh"
        f" && echo '{public_key}' >/home/{u}/.ssh/authorized_keys"
        f" && chown {u}:{u} /home/{u}/.ssh/authorized_keys"
        f" && chmod 0600 /home/{u}/.ssh/authorized_keys"
        f" && echo '{u} ALL=(ALL) NOPASSWD:ALL' >/etc/sudoers.d/90-cloud-init-users"
        " && chmod 0440 /etc/sudoers.d/90-cloud-init-users"
        " && visudo -cq",
    )
    who = th.run("sudo -n id -un", user=u).stdout.strip()
    if who != "root":
        raise RuntimeError(f"{th.name}: sudo as {u} gave {who!r}, not root")


def _state_file(name: str) -> Path:
    return CACHE / "hosts" / name / "host.json"


def load(name: str) -> TestHost | None:
    f = _state_file(name)
    if not f.exists():
        return None
    return TestHost(**json.loads(f.read_text()))


def create(name: str, ssh_port: int, boot_timeout: float = 120) -> TestHost:
    old = load(name)
    if old is not None:
        destroy(name)
    hdir = CACHE / "hosts" / name
    shutil.rmtree(hdir, ignore_errors=True)
    hdir.mkdir(parents=True)
    rootfs = hdir / "rootfs"
    _log(f"{name}: copying the base root filesystem")
    subprocess.run(["cp", "-a", "--reflink=auto", str(base_rootfs()), str(rootfs)], check=True)

    key = hdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh_dir = rootfs / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    os.chmod(ssh_dir / "authorized_keys", 0o600)

    host_key = rootfs / "etc" / "ssh" / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    known = hdir / "known_hosts"
    pub = host_key.with_suffix(".pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{ssh_port} {pub[0]} {pub[1]}\n")
    (rootfs / "etc" / "ssh" / "sshd_config.d" / "testhost.conf").write_text(
        f"Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
    )
    (rootfs / "etc" / "hostname").write_text(name + "\n")
    trust_local_cas(rootfs)

    nspawn = ["systemd-nspawn", "-q", "-D", str(rootfs), "--boot", "--register=no"]
    nspawn += ["--keep-unit", "-M", name]
    env = {**os.environ, "TESTHOST_TIMENS": "1" if time_namespaces() else "0"}
    with open(hdir / "console.log", "ab") as log:
        proc = subprocess.Popen(
            ["bash", "-c", SUPERVISE, "testhost-supervise", *nspawn],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    user_key = hdir / f"{SUDO_USER}_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(user_key)], check=True)
    th = TestHost(name, ssh_port, str(key), str(known), proc.pid, SUDO_USER, str(user_key))
    _state_file(name).write_text(json.dumps(asdict(th)))

    try:
        th.wait_up(boot_timeout)
    except RuntimeError:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name}: systemd-nspawn exited {proc.returncode}; see {hdir}/console.log"
            ) from None
        raise
    add_sudo_user(th, user_key.with_suffix(".pub").read_text().strip())
    _log(
        f"{name}: up, ssh -p {ssh_port} -i {key} root@127.0.0.1"
        f" (or -i {user_key} {SUDO_USER}@127.0.0.1, with sudo)"
    )
    return th


def destroy(name: str) -> None:
    th = load(name)
    hdir = CACHE / "hosts" / name
    if th is not None and th.alive():
        with contextlib.suppress(subprocess.TimeoutExpired):
            th.run("systemctl poweroff", check=False, timeout=15)
        for _ in range(60):
            if not th.alive():
                break
            time.sleep(0.5)
        else:
            os.killpg(th.pid, signal.SIGKILL)
            time.sleep(1)
    shutil.rmtree(hdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("name")
    c.add_argument("--ssh-port", type=int, required=True)
    d = sub.add_parser("destroy")
    d.add_argument("name")
    a = ap.parse_args()
    if a.cmd == "create":
        create(a.name, a.ssh_port)
    else:
        destroy(a.name)


if __name__ == "__main__":
    main()
