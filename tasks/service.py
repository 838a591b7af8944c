"""The llama-server service: its user, key, unit, and a restart only when something changed."""

from dataclasses import dataclass
from io import StringIO

from pyinfra.api.operation import OperationMeta
from pyinfra.context import host
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from llamahost import layout, render
from llamahost.config import HostConfig
from llamahost.gateway import haproxy as hx
from llamahost.spec import HostSpec
from tasks import rolling, secret
from tasks.activate import activate
from tasks.facts import LlamaUnitFiles


def account(cfg: HostConfig) -> None:
    server.group(name="Service group", group=cfg.service_user, system=True)
    server.user(  # noqa: S604  (shell= is the login shell, not a subprocess)
        name="Service user (no shell, no home)",
        user=cfg.service_user,
        group=cfg.service_user,
        system=True,
        shell="/usr/sbin/nologin",
        home="/nonexistent",
        create_home=False,
        ensure_home=False,
    )


def api_key(cfg: HostConfig) -> OperationMeta:
    """Key file readable by root and the service group only. Its content is never printed,
    in any mode (tasks/secret.py). Returns the operation that changes when the key does."""
    files.directory(
        name="Key directory",
        path=layout.parent(cfg.api_key_file),
        user="root",
        group=cfg.service_user,
        mode="0750",
    )
    if cfg.api_key is not None:
        written = secret.file(
            name="API key (supplied)",
            path=cfg.api_key_file,
            secret=secret.Secret(cfg.api_key),
            user="root",
            group=cfg.service_user,
            mode="0640",
        )
        # A mode or owner changed by hand is put back without a restart: only a new key
        # restarts the server.
        files.file(
            name="API key file mode and owner",
            path=cfg.api_key_file,
            user="root",
            group=cfg.service_user,
            mode="0640",
        )
        return written
    if not host.get_fact(File, path=cfg.api_key_file):
        # Shell because the key must be made on the host and never pass through pyinfra's
        # output: 48 random alphanumerics, created 0600 and renamed into place.
        server.shell(
            name="API key (generated on the host)",
            commands=[
                f"umask 077; tr -dc A-Za-z0-9 </dev/urandom | head -c 48 >{cfg.api_key_file}.tmp"
                f" && mv {cfg.api_key_file}.tmp {cfg.api_key_file}"
            ],
        )
    return files.file(
        name="API key file mode and owner",
        path=cfg.api_key_file,
        user="root",
        group=cfg.service_user,
        mode="0640",
    )


@dataclass(frozen=True)
class Units:
    """The host's llama-server units as this run leaves them."""

    changes: dict[str, list[OperationMeta]]  # unit → the files whose change restarts it
    stale: list[tuple[str, str]]  # (unit, its removal path) of another layout or count
    files_changed: list[OperationMeta]  # any of them changed: systemd reloads its units


def unit(spec: HostSpec, cpu_count: int) -> Units:
    """The unit (one llama-server) or the template and one drop-in per instance (several:
    llamahost/instances.py); what another layout or instance count left is found here and
    retired by ``run``."""
    files.put(
        name="Install the health wait script",
        src="files/llama_wait_healthy.py",
        dest=layout.HEALTH_SCRIPT,
        mode="0755",
    )
    xs = spec.instances
    installed: list[str] = host.get_fact(LlamaUnitFiles)
    found = set(installed)
    if len(xs) == 1:
        single = files.put(
            name=f"Render {layout.UNIT} (profile {spec.profile.name})",
            src=StringIO(render.unit(spec, cpu_count)),
            dest=layout.UNIT_PATH,
            mode="0644",
        )
        changes = {layout.UNIT: [single]}
    else:
        template = files.put(
            name=f"Render {layout.TEMPLATE_UNIT} (profile {spec.profile.name}, "
            f"{len(xs)} instances)",
            src=StringIO(render.unit(spec, cpu_count)),
            dest=layout.TEMPLATE_UNIT_PATH,
            mode="0644",
        )
        changes = {}
        for x in xs:
            files.directory(
                name=f"{x.unit} drop-in directory",
                path=layout.instance_dropin_dir(x.unit),
                user="root",
                group="root",
                mode="0755",
            )
            dropin = files.put(
                name=f"Render {x.unit}'s drop-in (port {x.port}"
                + (f", GPU {x.gpu}" if x.gpu is not None else "")
                + ")",
                src=StringIO(render.instance_dropin(spec, x, cpu_count)),
                dest=layout.instance_dropin(x.unit),
                mode="0644",
            )
            changes[x.unit] = [template, dropin]
    stale = []
    for name in sorted(found):
        if name == layout.UNIT and len(xs) > 1:
            stale.append((layout.UNIT, layout.UNIT_PATH))
        elif name.endswith(".service.d") and name.removesuffix(".d") not in changes:
            unit_name = name.removesuffix(".d")
            stale.append((unit_name, layout.instance_dropin_dir(unit_name)))
    return Units(changes, stale, [op for ops in changes.values() for op in ops])


def run(spec: HostSpec, units: Units, restart_when: list[OperationMeta]) -> None:
    """Retire what another layout left (drained behind gateways), then enable and start
    each llama-server; restart one only when its unit, the binary, model or key changed.
    Behind gateways, each restart is a drained one, one instance after the other and a
    few hosts at a time (tasks/rolling.py)."""
    gated = bool(rolling.gateways())
    bound = rolling.max_unavailable()
    host_server = hx.server_name(spec.name)
    for unit_name, path in units.stale:
        if gated:
            index = unit_name.removeprefix("llama-server@").removesuffix(".service")
            server = host_server if unit_name == layout.UNIT else f"{host_server}:{index}"
            rolling.retire(spec, unit_name, server, bound)
        else:
            systemd.service(
                name=f"Stop and disable {unit_name} (not in the host's layout any more)",
                service=unit_name,
                running=False,
                enabled=False,
            )
        if path.endswith(".d"):
            files.directory(name=f"Remove {path}", path=path, present=False)
        else:
            files.file(name=f"Remove {path}", path=path, present=False)
    changed = list(units.files_changed)
    if len(units.changes) == 1:
        changed.append(
            files.file(
                name=f"No {layout.TEMPLATE_UNIT} (one llama-server)",
                path=layout.TEMPLATE_UNIT_PATH,
                present=False,
            )
        )
    stale_ops = bool(units.stale)
    systemd.daemon_reload(
        name="Reload systemd units",
        _if=lambda: stale_ops or any(op.did_change() for op in changed),
    )
    for unit_name, ops in units.changes.items():
        instance = next(x for x in spec.instances if x.unit == unit_name)
        if not gated:
            activate(unit_name, restart_on=[*ops, *restart_when], clear_failed=True)
            continue
        started = activate(unit_name, clear_failed=True).started
        rolling.restart(spec, instance, [*ops, *restart_when], started, max_unavailable=bound)
