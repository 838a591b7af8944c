"""The service: enabled, running, unprivileged, listening where the profile says, and
running exactly what the deploy rendered for this host."""

from __future__ import annotations

from typing import Any

import pytest

from llamahost import instances as inst
from llamahost import layout, render
from tests.compliance.live import Server, listening_inodes

# A crash loop at RestartSec=10 passes this within a minute and StartLimitBurst=5 stops it
# soon after; one or two automatic restarts over a long uptime are a crash worth reading
# about in the journal, not a loop.
MAX_AUTOMATIC_RESTARTS = 2


def test_enabled_active_not_crash_looping(server: Server, host: Any) -> None:
    """Every llama-server of the host is enabled, active and not crash-looping.

    README: the deploy enables and starts the unit (each instance's, on a host with
    several); Restart=on-failure with a start limit. Crash-looping: more than
    MAX_AUTOMATIC_RESTARTS automatic restarts (NRestarts).
    """
    for s in server.each():
        unit = s.unit
        props = s.unit_properties("UnitFileState", "ActiveState", "SubState", "NRestarts")
        assert host.service(unit).is_enabled, (
            f"{unit} is not enabled (UnitFileState={props['UnitFileState']})"
        )
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), (unit, props)
        restarts = int(props["NRestarts"])
        assert restarts <= MAX_AUTOMATIC_RESTARTS, (
            f"{unit} restarted itself {restarts} times since it was started (crash loop?); "
            "see journalctl -u " + unit
        )


def test_runs_as_the_service_user_not_root(server: Server, host: Any) -> None:
    """llama-server runs as the service user, not root; the user has no login shell.

    README: "creates the llama system user (no shell, no home)"; the unit's User=.
    Read from the running process, not the unit.
    """
    user = server.cfg.service_user
    for s in server.each():
        proc = host.process.get(pid=s.main_pid)
        assert proc.user != "root", f"{s.unit} (pid {s.main_pid}) runs as root"
        assert proc.user == user, f"{s.unit} runs as {proc.user}, expected {user}"
    assert host.user(user).shell == "/usr/sbin/nologin"


def test_listens_on_the_profile_address_and_port(server: Server, host: Any) -> None:
    """Each llama-server itself listens on the profile's address and its port.

    llama_host and llama_port (the guide: 0.0.0.0:8080); instance i of several on
    llama_port + i. Read from /proc/net/tcp{,6} and the process's own sockets: a minimal
    Debian host has no `ss`, and a port held by some other process must not count.
    """
    p = server.cfg.profile
    table = "/proc/net/tcp6" if ":" in p.host else "/proc/net/tcp"
    sockets = host.file(table).content_string
    for s in server.each():
        port = s.instance.port
        inodes = listening_inodes(sockets, p.host, port)
        assert inodes, f"nothing listens on {p.host}:{port} ({s.unit})"
        fds = host.check_output("ls -l /proc/%s/fd", str(s.main_pid))
        ours = {i for i in inodes if f"socket:[{i}]" in fds}
        assert ours, f"{p.host}:{port} is held by another process, not {s.unit}"


def _same(what: str, expected: str, on_host: str) -> None:
    if on_host != expected:
        changed = [
            f"- {a!r}\n+ {b!r}"
            for a, b in zip(expected.splitlines(), on_host.splitlines(), strict=False)
            if a != b
        ] or [f"{len(expected.splitlines())} lines expected, {len(on_host.splitlines())} found"]
        raise AssertionError(f"{what} differs from the deploy's rendering:\n" + "\n".join(changed))


def test_unit_file_is_the_one_the_deploy_renders(server: Server, host: Any) -> None:
    """The unit file is exactly what the deploy renders, with no drop-in overriding it; on
    a host with several llama-servers, the template and each instance's drop-in (its only
    one). No unit or drop-in of another layout or instance count is left.

    Rendered here by llamahost.render from the host's spec, the functions the deploy
    uploads the output of: a hand edit shows even before anyone restarts the service.
    """
    spec = server.spec
    several = len(spec.instances) > 1
    path = layout.TEMPLATE_UNIT_PATH if several else layout.UNIT_PATH
    _same(path, render.unit(spec, server.cpu_count), host.file(path).content_string)
    for s in server.each():
        dropins = s.unit_properties("DropInPaths")["DropInPaths"].split()
        if not several:
            assert not dropins, f"drop-ins override {s.unit}: {dropins}"
            continue
        own = layout.instance_dropin(s.unit)
        assert dropins == [own], f"{s.unit}'s drop-ins are {dropins}, not only {own}"
        expected = render.instance_dropin(spec, s.instance, server.cpu_count)
        _same(own, expected, host.file(own).content_string)
    wanted = (
        {layout.TEMPLATE_UNIT, *(f"{x.unit}.d" for x in spec.instances)}
        if several
        else {layout.UNIT}
    )
    installed = set(host.check_output("cd %s && ls -d llama-server* 2>/dev/null; true",
                                      layout.SYSTEMD_DIR).split())  # fmt: skip
    assert installed == wanted, (
        f"llama-server units in {layout.SYSTEMD_DIR}: {sorted(installed)}; the host's layout "
        f"({len(spec.instances)} llama-servers) has {sorted(wanted)}"
    )


def test_running_process_has_the_inventorys_command_line(server: Server) -> None:
    """Each running process's command line is exactly the inventory's.

    /proc/<MainPID>/cmdline against llamahost.render.server_args for the host (and the
    instance): a unit edited and restarted by hand, or changed and never restarted, shows
    here.
    """
    for s in server.each():
        expected = s.expected_argv()
        live = s.cmdline
        if live != expected:
            extra = [a for a in live if a not in expected]
            missing = [a for a in expected if a not in live]
            raise AssertionError(
                f"{s.unit}: live argv differs from the inventory's: missing {missing}, "
                f"unexpected {extra}\nlive:     {' '.join(live)}\nexpected: {' '.join(expected)}"
            )


def test_each_instance_on_its_gpu_and_cpus(server: Server, host: Any) -> None:
    """On a host with several llama-servers on GPUs, each process sees only its GPU
    (CUDA_VISIBLE_DEVICES in its environment, numbered in PCI bus order) and, when pinned,
    runs on its GPU's NUMA-local CPUs only (Cpus_allowed_list), as docs/instances.md says.
    Read from the running processes, not the drop-ins."""
    several = [s for s in server.each() if s.instance.gpu is not None]
    if not several:
        pytest.skip(f"{server.target.name} runs no GPU instances (one llama-server, or CPU)")
    for s in several:
        env = host.check_output("tr '\\0' '\\n' < /proc/%s/environ", str(s.main_pid))
        seen = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
        assert seen.get("CUDA_VISIBLE_DEVICES") == str(s.instance.gpu), (
            f"{s.unit} sees CUDA_VISIBLE_DEVICES={seen.get('CUDA_VISIBLE_DEVICES')!r}, "
            f"expected GPU {s.instance.gpu}"
        )
        assert seen.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID", f"{s.unit}: CUDA_DEVICE_ORDER"
        if s.instance.numa_node is None:
            continue
        status = host.check_output("grep Cpus_allowed_list /proc/%s/status", str(s.main_pid))
        allowed = inst.parse_cpulist(status.split(":", 1)[1])
        assert allowed == s.instance.cpus, (
            f"{s.unit} may run on CPUs {inst.format_cpulist(allowed)}, expected its GPU's "
            f"{inst.format_cpulist(s.instance.cpus)} (NUMA node {s.instance.numa_node})"
        )
