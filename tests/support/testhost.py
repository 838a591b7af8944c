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

create(netns=True) gives a host a network namespace of its own instead: an address on
NET_PREFIX.0/24 (NET_PREFIX.1 is this machine's side, on the bridge BRIDGE, which joins all
such hosts), its sshd listening there, so that a host firewall (nftables) can be tested in
it without touching this machine's network. No forwarding, no NAT: such a host reaches this
machine and its peers, nothing else; extra_packages (installed before it boots, over this
machine's network) bring what it needs, e.g. ("nftables",).

  python -m tests.support.testhost create NAME --ssh-port 2222
  python -m tests.support.testhost destroy NAME
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LLAMAHOST_CACHE", REPO / ".cache"))
MIRROR = os.environ.get("LLAMAHOST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "systemd,systemd-sysv,dbus,openssh-server,python3,ca-certificates,sudo"
# The login a cloud image gives (Debian's images: `admin`, Ubuntu's: `ubuntu`).
SUDO_USER = "admin"
# The hosts with a network namespace of their own (create(netns=True)): NET_PREFIX.2-254,
# one /24 on one bridge in this machine's namespace holding NET_PREFIX.1. Host N's namespace
# is llh-n<N> (the address's last byte; `ip netns add` claims it atomically, so that is the
# allocation), its veth end on the bridge llh-v<N>, the other end eth0 inside.
NET_PREFIX = "10.203.0"
BRIDGE = "llh-br0"
NETNS_PREFIX = "llh-n"
VETH_PREFIX = "llh-v"
NETNS_DIR = Path("/run/netns")
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
    # Where its sshd listens: this machine's loopback, or its own namespace's address.
    address: str = "127.0.0.1"
    netns: str = ""  # its network namespace (create(netns=True)); "" shares the machine's

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
            f"{user}@{self.address}",
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
    known = {f.name for f in fields(TestHost)}
    return TestHost(**{k: v for k, v in json.loads(f.read_text()).items() if k in known})


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


@contextlib.contextmanager
def _net_lock() -> Iterator[None]:
    """Serialises the bridge's creation and removal and the address scan across sessions."""
    path = CACHE / "net" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _link_exists(dev: str) -> bool:
    return Path("/sys/class/net", dev).exists()


def _ensure_bridge() -> None:
    """BRIDGE up with NET_PREFIX.1/24; each step tolerates its having been done already."""
    if not _link_exists(BRIDGE):
        p = _ip("link", "add", BRIDGE, "type", "bridge", check=False)
        if p.returncode != 0 and not _link_exists(BRIDGE):
            raise RuntimeError(f"ip link add {BRIDGE}: {p.stderr.strip()}")
    have = _ip("-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f" {NET_PREFIX}.1/24 " not in have:
        p = _ip("addr", "add", f"{NET_PREFIX}.1/24", "dev", BRIDGE, check=False)
        if p.returncode != 0 and "File exists" not in p.stderr:
            raise RuntimeError(f"ip addr add on {BRIDGE}: {p.stderr.strip()}")
    _ip("link", "set", BRIDGE, "up")


def _maybe_remove_bridge() -> None:
    """Remove BRIDGE once no host uses it (no namespace of ours, no port on it)."""
    if not _link_exists(BRIDGE):
        return
    ours = NETNS_DIR.exists() and any(NETNS_DIR.glob(NETNS_PREFIX + "*"))
    ports = any(Path("/sys/class/net", BRIDGE, "brif").iterdir())
    if not ours and not ports:
        _ip("link", "del", BRIDGE, check=False)


def _netns_file(name: str) -> Path:
    """Records a host's namespace the moment it is claimed, before host.json exists."""
    return CACHE / "hosts" / name / "netns"


def _net_up(name: str) -> tuple[str, str]:
    """Claim a free address (its namespace), wire it to the bridge: (namespace, address)."""
    with _net_lock():
        for n in range(2, 255):
            ns = f"{NETNS_PREFIX}{n}"
            if (NETNS_DIR / ns).exists() or _link_exists(f"{VETH_PREFIX}{n}"):
                continue
            added = _ip("netns", "add", ns, check=False)  # O_EXCL: atomic, the claim
            if added.returncode == 0:
                break
            if not (NETNS_DIR / ns).exists():
                raise RuntimeError(f"ip netns add {ns}: {added.stderr.strip()}")
        else:
            raise RuntimeError(f"no free address left in {NET_PREFIX}.0/24")
        _netns_file(name).write_text(ns + "\n")
        _ensure_bridge()
    address, veth = f"{NET_PREFIX}.{n}", f"{VETH_PREFIX}{n}"
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    if _ip("link", "set", veth, "master", BRIDGE, check=False).returncode != 0:
        with _net_lock():  # removed meanwhile by a session with another CACHE
            _ensure_bridge()
        _ip("link", "set", veth, "master", BRIDGE)
    _ip("link", "set", veth, "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    return ns, address


def _net_down(ns: str) -> None:
    """Remove a host's veth pair and namespace (freeing its address), then maybe the bridge."""
    if not ns.startswith(NETNS_PREFIX):
        return
    veth = VETH_PREFIX + ns.removeprefix(NETNS_PREFIX)
    if _link_exists(veth):
        _ip("link", "del", veth, check=False)
    if (NETNS_DIR / ns).exists():
        _ip("netns", "del", ns, check=False)
    with _net_lock():
        _maybe_remove_bridge()


def install_packages(name: str, rootfs: Path, packages: tuple[str, ...]) -> None:
    """apt-get install into a host's root filesystem before it boots, in a container that
    shares this machine's network (a host in a namespace of its own has no mirror)."""
    _log(f"{name}: installing {' '.join(packages)}")
    script = (
        "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
        + " ".join(packages)
        + " && apt-get clean"
    )
    argv = ["systemd-nspawn", "-q", "-D", str(rootfs), "--register=no", "--keep-unit"]
    argv += ["-M", f"{name}-apt", "--pipe", "-E", "DEBIAN_FRONTEND=noninteractive"]
    p = subprocess.run([*argv, "sh", "-c", script], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: apt-get install {packages} failed:\n{p.stdout}{p.stderr}")


def create(
    name: str,
    ssh_port: int,
    boot_timeout: float = 120,
    netns: bool = False,
    extra_packages: tuple[str, ...] = (),
) -> TestHost:
    """A booted host reached over SSH. netns: its own network namespace and address (see
    the module's doc); extra_packages: installed before it boots."""
    old = load(name)
    if old is not None or _netns_file(name).exists():
        destroy(name)
    hdir = CACHE / "hosts" / name
    shutil.rmtree(hdir, ignore_errors=True)
    hdir.mkdir(parents=True)
    rootfs = hdir / "rootfs"
    _log(f"{name}: copying the base root filesystem")
    subprocess.run(["cp", "-a", "--reflink=auto", str(base_rootfs()), str(rootfs)], check=True)
    try:
        return _create(name, ssh_port, boot_timeout, netns, extra_packages)
    except BaseException:
        if not _state_file(name).exists() and _netns_file(name).exists():
            _net_down(_netns_file(name).read_text().strip())
            _netns_file(name).unlink()
        raise


def _create(
    name: str,
    ssh_port: int,
    boot_timeout: float,
    netns: bool,
    extra_packages: tuple[str, ...],
) -> TestHost:
    hdir = CACHE / "hosts" / name
    rootfs = hdir / "rootfs"
    trust_local_cas(rootfs)
    if extra_packages:
        install_packages(name, rootfs, extra_packages)
    ns, address = _net_up(name) if netns else ("", "127.0.0.1")

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
    # ssh looks a host on port 22 up by its bare address, on another port as [address]:port.
    pattern = address if ssh_port == 22 else f"[{address}]:{ssh_port}"
    known.write_text(f"{pattern} {pub[0]} {pub[1]}\n")
    (rootfs / "etc" / "ssh" / "sshd_config.d" / "testhost.conf").write_text(
        f"Port {ssh_port}\nListenAddress {address}\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
    )
    (rootfs / "etc" / "hostname").write_text(name + "\n")

    nspawn = ["systemd-nspawn", "-q", "-D", str(rootfs), "--boot", "--register=no"]
    nspawn += ["--keep-unit", "-M", name]
    if ns:
        # Its own namespace: it may manage its network (nftables) as a VM would.
        nspawn += [f"--network-namespace-path={NETNS_DIR / ns}", "--capability=CAP_NET_ADMIN"]
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
    th = TestHost(
        name, ssh_port, str(key), str(known), proc.pid, SUDO_USER, str(user_key), address, ns
    )
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
        f"{name}: up, ssh -p {ssh_port} -i {key} root@{address}"
        f" (or -i {user_key} {SUDO_USER}@{address}, with sudo)"
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
    ns_file = _netns_file(name)
    ns = th.netns if th is not None else ""
    if not ns and ns_file.exists():  # create() stopped before it wrote host.json
        ns = ns_file.read_text().strip()
    if ns:
        _net_down(ns)
    shutil.rmtree(hdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("name")
    c.add_argument("--ssh-port", type=int, required=True)
    c.add_argument("--netns", action="store_true", help="its own network namespace and address")
    c.add_argument("--package", action="append", default=[], help="install before it boots")
    d = sub.add_parser("destroy")
    d.add_argument("name")
    a = ap.parse_args()
    if a.cmd == "create":
        create(a.name, a.ssh_port, netns=a.netns, extra_packages=tuple(a.package))
    else:
        destroy(a.name)


if __name__ == "__main__":
    main()
