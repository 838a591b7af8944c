"""The service: enabled, running, unprivileged, listening where the profile says, and
running exactly what the deploy rendered for this host."""

from __future__ import annotations

from typing import Any

from llamahost import render
from llamahost.layout import UNIT, UNIT_PATH
from tests.compliance.live import Server, listening_inodes

# A crash loop at RestartSec=10 passes this within a minute and StartLimitBurst=5 stops it
# soon after; one or two automatic restarts over a long uptime are a crash worth reading
# about in the journal, not a loop.
MAX_AUTOMATIC_RESTARTS = 2


def test_enabled_active_not_crash_looping(server: Server, host: Any) -> None:
    """llama-server is enabled, active and not crash-looping.

    README: the deploy enables and starts the unit; Restart=on-failure with a start limit.
    Crash-looping: more than MAX_AUTOMATIC_RESTARTS automatic restarts (NRestarts).
    """
    svc = host.service(UNIT)
    props = server.unit_properties("UnitFileState", "ActiveState", "SubState", "NRestarts")
    assert svc.is_enabled, f"{UNIT} is not enabled (UnitFileState={props['UnitFileState']})"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    restarts = int(props["NRestarts"])
    assert restarts <= MAX_AUTOMATIC_RESTARTS, (
        f"{UNIT} restarted itself {restarts} times since it was started (crash loop?); "
        "see journalctl -u " + UNIT
    )


def test_runs_as_the_service_user_not_root(server: Server, host: Any) -> None:
    """llama-server runs as the service user, not root; the user has no login shell.

    README: "creates the llama system user (no shell, no home)"; the unit's User=.
    Read from the running process, not the unit.
    """
    user = server.cfg.service_user
    proc = host.process.get(pid=server.main_pid)
    assert proc.user != "root", f"llama-server (pid {server.main_pid}) runs as root"
    assert proc.user == user, f"llama-server runs as {proc.user}, expected {user}"
    assert host.user(user).shell == "/usr/sbin/nologin"


def test_listens_on_the_profile_address_and_port(server: Server, host: Any) -> None:
    """llama-server itself listens on the profile's address and port.

    llama_host and llama_port (the guide: 0.0.0.0:8080). Read from /proc/net/tcp{,6} and
    the process's own sockets: a minimal Debian host has no `ss`, and a port held by some
    other process must not count.
    """
    p = server.cfg.profile
    table = "/proc/net/tcp6" if ":" in p.host else "/proc/net/tcp"
    inodes = listening_inodes(host.file(table).content_string, p.host, p.port)
    assert inodes, f"nothing listens on {p.host}:{p.port}"
    fds = host.check_output("ls -l /proc/%s/fd", str(server.main_pid))
    ours = {i for i in inodes if f"socket:[{i}]" in fds}
    assert ours, f"{p.host}:{p.port} is held by another process, not llama-server"


def test_unit_file_is_the_one_the_deploy_renders(server: Server, host: Any) -> None:
    """The unit file is exactly what the deploy renders, with no drop-in overriding it.

    Rendered here by llamahost.render.unit from the host's spec, the function the deploy
    uploads the output of: a hand edit shows even before anyone restarts the service.
    """
    expected = render.unit(server.spec, server.cpu_count)
    on_host = host.file(UNIT_PATH).content_string
    if on_host != expected:
        changed = [
            f"- {a!r}\n+ {b!r}"
            for a, b in zip(expected.splitlines(), on_host.splitlines(), strict=False)
            if a != b
        ]
        raise AssertionError(f"{UNIT} differs from the deploy's rendering:\n" + "\n".join(changed))
    dropins = server.unit_properties("DropInPaths")["DropInPaths"]
    assert not dropins, f"drop-ins override {UNIT}: {dropins}"


def test_running_process_has_the_inventorys_command_line(server: Server) -> None:
    """The running process's command line is exactly the inventory's.

    /proc/<MainPID>/cmdline against llamahost.render.server_args for the host: a unit
    edited and restarted by hand, or changed and never restarted, shows here.
    """
    expected = server.expected_argv()
    live = server.cmdline
    if live != expected:
        extra = [a for a in live if a not in expected]
        missing = [a for a in expected if a not in live]
        raise AssertionError(
            f"live argv differs from the inventory's: missing {missing}, unexpected {extra}\n"
            f"live:     {' '.join(live)}\nexpected: {' '.join(expected)}"
        )
