"""Drivers a host already has, on Ubuntu 24.04: kept when what runs is the pinned branch and
flavour from the chosen source, otherwise moved in one apt transaction (holds released,
the old packages purged, the holds taken again) with one reboot; Secure Boot refusing DKMS
before any change. Every planned transaction is handed to apt's own resolver (``apt-get
-s``) over a modelled package universe (tests/plan/aptsim.py), and every converged host's
rerun plans nothing.

Host states (tests/plan/fixtures/README.md): ``dpkg -l`` lines *modelled* on what each
installation leaves (Canonical's nvidia-driver-580-server-open with DKMS; Canonical's
550-server-open precompiled; NVIDIA's cuda-drivers → nvidia-driver-580-open 580.105.08),
loaded-module lines in /proc/driver/nvidia/version's format.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pyinfra.api.exceptions import PyinfraError

from llamahost import gpu
from tests.plan import aptsim
from tests.plan.fakehost import KERNELS, FakeHost, Plan, fixture, plan

U = "ubuntu-24.04"
K = KERNELS[U]  # 6.14.0-1015-aws, kernel metapackage linux-image-aws
MOVE_OP = "Move the driver to branch"
REBOOT_OP = "Reboot into the NVIDIA driver"
HOLD_OP = "Hold the driver packages"
APT = (
    'DEBIAN_FRONTEND=noninteractive apt-get -y -o Dpkg::Options::="--force-confdef" '
    '-o Dpkg::Options::="--force-confold" '
)
REHOLD = " ".join(
    [
        "; rc=$?;",
        "dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n'",
        *(f"'{p}'" for p in gpu.HOLD_PATTERNS),
        "2>/dev/null | awk '$1 == \"ii\" {print $2}' | xargs -r apt-mark hold; exit $rc; }",
    ]
)
CUDA_LINES = "".join(ln for ln in fixture(f"dpkg-l-{U}-gpu-stack.txt").splitlines(True)[:2])


def canonical_set(branch: str, variant: str = "-server-open") -> list[str]:
    return [
        f"linux-modules-nvidia-{branch}{variant}-aws",
        f"linux-modules-nvidia-{branch}{variant}-{K}",
        f"nvidia-headless-no-dkms-{branch}{variant}",
        f"nvidia-utils-{branch}-server",
    ]


def held(dpkg_lines: str) -> str:
    """The same lines after this toolkit's hold (``hi`` for the held patterns)."""
    out = []
    for line in dpkg_lines.splitlines(True):
        name = line.split()[1].split(":")[0] if len(line.split()) > 1 else ""
        if line.startswith("ii ") and any(
            re.fullmatch(p.replace("*", ".*"), name) for p in gpu.HOLD_PATTERNS
        ):
            line = "hi" + line[2:]
        out.append(line)
    return "".join(out)


def names(dpkg_lines: str, held_only: bool = False) -> list[str]:
    return sorted(
        ln.split()[1].split(":")[0]
        for ln in dpkg_lines.splitlines()
        if ln.split()[:1] == ["hi"] or (not held_only and ln.split()[:1] == ["ii"])
    )


def foreign(stack: str, loaded: str, kind: str, **kw: object) -> FakeHost:
    """A driver installed by someone else: not held, the packaged persistenced."""
    return FakeHost(
        U,
        driver="foreign",
        stack=stack,
        loaded=loaded,
        module_kind=kind,
        persistence=False,
        **kw,  # type: ignore[arg-type]
    )


def converged(stack: str, loaded: str, kind: str, **kw: object) -> FakeHost:
    """The same host after this toolkit's run: held, keyring, pin, blacklist, drop-in."""
    return FakeHost(
        U,
        driver="current",
        stack=CUDA_LINES + held(stack),
        loaded=loaded,
        module_kind=kind,
        **kw,  # type: ignore[arg-type]
    )


def move(p: Plan) -> str:
    (op,) = [op for op in p.ops if op.name.startswith(MOVE_OP)]
    (command,) = op.commands
    return command


def expected_move(install: list[str], remove: list[str], unhold: list[str]) -> str:
    prefix = f"apt-mark unhold {' '.join(unhold)} && " if unhold else ""
    return (
        f"{prefix}{{ {APT}install --purge --allow-change-held-packages --allow-downgrades "
        + " ".join([*install, *(r + "-" for r in remove)])
        + REHOLD
    )


def reboots_once(p: Plan) -> None:
    assert p.result.reboot is not None and p.result.reboot.will
    assert len([n for n in p.changes if n.startswith(REBOOT_OP)]) == 1


def accepted(tmp_path: Path, dpkg_lines: str, command: str) -> aptsim.Simulation:
    sim = aptsim.simulate(tmp_path / "aptroot", dpkg_lines, command)
    assert sim.rc == 0, sim.output
    assert "held broken packages" not in sim.output
    return sim


DKMS_580 = fixture(f"dpkg-l-{U}-canonical-580-dkms.txt")
C550 = fixture(f"dpkg-l-{U}-canonical-550-precompiled.txt")
NV580 = fixture(f"dpkg-l-{U}-nvidia-580-open.txt")
CURRENT_580 = fixture(f"dpkg-l-{U}-gpu-stack.txt")
LOADED_580 = fixture("proc-driver-nvidia-version-580-open.txt")
LOADED_550 = fixture("proc-driver-nvidia-version-550-open.txt")
LOADED_580_NV = fixture("proc-driver-nvidia-version-580-105-open.txt")
LOADED_580_PROP = fixture("proc-driver-nvidia-version-580-proprietary.txt")
LOADED_590 = fixture("proc-driver-nvidia-version-590-open.txt")


def base_and(stack: str) -> str:
    return fixture(f"dpkg-l-{U}-base.txt") + stack


# ---------------------------------------------------------------- same branch, DKMS
@pytest.mark.parametrize("secure_boot", [False, True], ids=["sb-off", "sb-on-module-loads"])
def test_same_branch_from_canonicals_dkms_is_kept(secure_boot: bool) -> None:
    p = plan(foreign(DKMS_580, LOADED_580, "dkms", secure_boot=secure_boot))
    assert not p.has(MOVE_OP)
    # The DKMS set it runs is the plan: already installed, nothing to install.
    assert p.commands("NVIDIA driver 580 (open, dkms)") == ()
    decision = p.result.reboot
    assert decision is not None and not decision.needed and not p.has(REBOOT_OP)
    assert p.has(HOLD_OP) and "apt-mark hold" in p.commands(HOLD_OP)[0]
    # What changes is ours only: repository, pin, blacklist, drop-in, holds, persistence
    # mode; no driver package (and no CUDA package: step 4 installs those).
    assert p.changes == [
        "Keep the driver on Canonical's packages (apt pin)",
        "llamahost download cache",
        "Download NVIDIA's cuda-keyring 1.1-1",
        "NVIDIA's CUDA repository (ubuntu2404, cuda-keyring)",
        "Update apt lists (repository or pin changed)",
        "nvidia-persistenced in persistence mode (drop-in)",
        "Reload systemd units (persistenced drop-in)",
        "Blacklist nouveau",
        "Rebuild the initramfs without nouveau",
        "Hold the driver packages (no unattended driver/library mismatch)",
        "Restart nvidia-persistenced (drop-in changed or persistence mode off)",
        "Verify: nvidia-smi on the driver branch, persistence mode Enabled on every GPU",
    ]


@pytest.mark.parametrize("persistence", [True, False], ids=["persistence-on", "persistence-off"])
def test_the_full_metapackage_running_is_kept_without_a_package_or_a_reboot(
    persistence: bool,
) -> None:
    """nvidia-driver-580-server-open as several clouds' GPU images ship it (DKMS, loaded; the
    full metapackage depends on nvidia-dkms and the user space directly, without the
    headless metapackage the toolkit installs itself): kept, whatever metapackage put it
    there; no driver package, no reboot."""
    assert "nvidia-headless-580-server-open" not in names(DKMS_580)
    host = FakeHost(U, driver="foreign", stack=DKMS_580, loaded=LOADED_580, module_kind="dkms",
                    persistence=persistence)  # fmt: skip
    p = plan(host)
    assert p.commands("NVIDIA driver 580 (open, dkms)") == ()
    assert not p.has(MOVE_OP) and not p.has(REBOOT_OP)
    decision = p.result.reboot
    assert decision is not None and not decision.needed
    installs = [c for op in p.ops for c in op.commands if " install " in c]
    assert not [c for c in installs if "nvidia" in c], installs


# Canonical's headless set without nvidia-smi's package (the toolkit's own DKMS choice,
# installed by hand or by an image without the utilities), running 580.95.05.
V580 = "580.95.05-0ubuntu0.24.04.2"
HEADLESS_580 = "".join(
    ln
    for ln in DKMS_580.splitlines(True)
    if ln.split()[1] not in ("nvidia-driver-580-server-open", "nvidia-utils-580-server")
) + "".join(
    f"ii  {n:<41} {V580:<30} amd64        (modelled)\n"
    for n in ("nvidia-headless-580-server-open", "nvidia-headless-no-dkms-580-server-open")
)
# A later point release of the branch in the archive (modelled on Canonical's -updates):
# what an unpinned install of nvidia-utils-580-server would take, library and all.
V580_NEXT = "580.105.08-0ubuntu0.24.04.1"
NEXT_580 = "\n".join(
    f"Package: {name}\nArchitecture: amd64\nVersion: {V580_NEXT}\n{fields}"
    f"Filename: pool/{name}_{V580_NEXT}_amd64.deb\nSize: 1\nDescription: {name} (modelled)\n"
    for name, fields in (
        ("nvidia-firmware-580-server-580.105.08", ""),
        (
            "nvidia-kernel-common-580-server",
            "Provides: nvidia-kernel-common, "
            "nvidia-kernel-common-580-server-580.105.08\n"
            "Depends: nvidia-firmware-580-server-580.105.08\n",
        ),
        (
            "libnvidia-compute-580-server",
            "Provides: libnvidia-compute, libcuda1\n"
            "Depends: nvidia-kernel-common-580-server-580.105.08\n",
        ),
        (
            "nvidia-utils-580-server",
            "Provides: nvidia-utils, nvidia-smi\n"
            "Depends: nvidia-kernel-common-580-server-580.105.08, "
            f"libnvidia-compute-580-server (= {V580_NEXT})\n",
        ),
    )
)


def test_a_kept_driver_gains_its_utilities_at_the_running_version_without_a_reboot(
    tmp_path: Path,
) -> None:
    """The running 580.95.05 headless set, kept; nvidia-smi's package is missing. It is
    added at the version that runs (named in the plan), never a reboot; apt accepts that
    over an archive that has a newer point release, where the unpinned install would have
    upgraded libnvidia-compute under the loaded module (control); the rerun plans nothing."""
    p = plan(foreign(HEADLESS_580, LOADED_580, "dkms"))
    pinned = f"nvidia-utils-580-server={V580}"
    (command,) = p.commands("NVIDIA driver 580 (open, dkms)")
    assert command.endswith(" " + pinned), command
    assert not p.has(MOVE_OP) and not p.has(REBOOT_OP)
    decision = p.result.reboot
    assert decision is not None and not decision.needed, decision
    sim = aptsim.simulate(tmp_path / "aptroot", base_and(HEADLESS_580), command, extra=NEXT_580)
    assert sim.rc == 0, sim.output
    assert sim.acts("Inst") == ["nvidia-utils-580-server"], sim.output
    assert f"Inst nvidia-utils-580-server ({V580} " in sim.output, sim.output
    unpinned = aptsim.simulate(
        tmp_path / "aptroot", base_and(HEADLESS_580), command.replace(f"={V580}", ""),
        extra=NEXT_580,
    )  # fmt: skip
    assert f"Inst libnvidia-compute-580-server [{V580}] ({V580_NEXT} " in unpinned.output, (
        unpinned.output
    )
    again = plan(converged(sim.applied(HEADLESS_580), LOADED_580, "dkms"))
    assert again.changes == [], again.changes


def test_same_branch_dkms_host_converged_plans_nothing() -> None:
    p = plan(converged(DKMS_580, LOADED_580, "dkms"))
    assert p.changes == []


def test_same_branch_dkms_to_precompiled_on_request_migrates_fully_and_reboots_once(
    tmp_path: Path,
) -> None:
    p = plan(foreign(DKMS_580, LOADED_580, "dkms"), {"llama_driver_kernel_modules": "precompiled"})
    # DKMS's own packages go; nvidia-kernel-source stays: nvidia-headless-no-dkms depends
    # on it (canonical/nvidia-graphics-drivers, 580-server, debian/control).
    removed = ["nvidia-dkms-580-server-open", "nvidia-driver-580-server-open"]
    assert move(p) == expected_move(canonical_set("580"), removed, [])
    reboots_once(p)
    sim = accepted(tmp_path, base_and(DKMS_580), move(p))
    assert sim.acts("Purg") == removed
    assert "nvidia-dkms-580-server-open" not in sim.acts("Inst")
    # After the reboot, on the state the move leaves (derived from apt's answer, held):
    # the precompiled set runs, nothing to do.
    after = sim.applied(DKMS_580)
    assert "nvidia-kernel-source-580-server-open" in names(after)
    rerun = plan(
        converged(after, LOADED_580, "precompiled"), {"llama_driver_kernel_modules": "precompiled"}
    )
    assert rerun.changes == []


def test_the_purge_of_nvidia_kernel_source_on_the_precompiled_path_is_what_apt_refuses(
    tmp_path: Path,
) -> None:
    """The control: purging nvidia-kernel-source beside the precompiled set (what an earlier
    classification planned on every rerun of a converged host) is refused by apt's resolver
    over the control data's relations."""
    after = aptsim.simulate(tmp_path / "a", base_and(DKMS_580), _move_to_precompiled())
    state = after.applied(base_and(DKMS_580))
    command = f"{APT}install --purge --allow-change-held-packages " + " ".join(
        [*canonical_set("580"), "nvidia-kernel-source-580-server-open-"]
    )
    sim = aptsim.simulate(tmp_path / "b", state, command)
    assert sim.rc != 0, sim.output
    assert "nvidia-headless-no-dkms-580-server-open" in sim.output


def _move_to_precompiled() -> str:
    return move(
        plan(foreign(DKMS_580, LOADED_580, "dkms"), {"llama_driver_kernel_modules": "precompiled"})
    )


# ---------------------------------------------------------------- another branch
@pytest.mark.parametrize("was_held", [False, True], ids=["unheld", "held-by-this-toolkit"])
def test_another_canonical_branch_is_replaced_in_one_transaction(
    tmp_path: Path, was_held: bool
) -> None:
    stack = held(C550) if was_held else C550
    p = plan(foreign(stack, LOADED_550, "precompiled"))
    # Every 550 package goes but the kernel ABI's signatures, which every branch's modules
    # for that ABI depend on (580's too).
    old = [n for n in names(C550) if n != f"linux-signatures-nvidia-{K}"]
    unhold = names(stack, held_only=True)
    assert bool(unhold) == was_held
    assert move(p) == expected_move(canonical_set("580"), old, unhold)
    assert not p.has(HOLD_OP)  # the move's command holds again, also when apt fails
    reboots_once(p)
    assert p.result.reboot is not None
    assert any(r.startswith("the driver is replaced") for r in p.result.reboot.reasons)
    sim = accepted(tmp_path, base_and(stack), move(p))
    assert sim.acts("Purg") == old
    assert set(canonical_set("580")) <= set(sim.acts("Inst"))
    # The second run, over the state apt's answer leaves (held): nothing planned.
    rerun = plan(converged(sim.applied(stack), LOADED_580, "precompiled"))
    assert rerun.changes == []


def test_the_purge_of_the_abis_signatures_on_a_branch_move_is_what_apt_refuses(
    tmp_path: Path,
) -> None:
    """Control for the shared linux-signatures-nvidia-<ABI>: the 550 -> 580 move as an
    older classification planned it (the signatures purged as a 550 package, "161" in a
    5.15.0-161 kernel read as a branch) is refused by apt, since 580's modules for the same
    ABI depend on them; the move as planned now is accepted (the test above)."""
    p = plan(foreign(C550, LOADED_550, "precompiled"))
    utils = " nvidia-compute-utils-550-server-"
    command = move(p).replace(utils, f" linux-signatures-nvidia-{K}-{utils}")
    assert f"linux-signatures-nvidia-{K}-" in command
    sim = aptsim.simulate(tmp_path / "aptroot", base_and(C550), command)
    assert sim.rc != 0, sim.output
    assert f"linux-signatures-nvidia-{K}" in sim.output, sim.output


def test_held_packages_without_the_unhold_are_what_apt_refuses(tmp_path: Path) -> None:
    # Why the transaction releases the holds: the same install with the 550 packages still
    # held, named only as dependencies that must go, is refused by apt's resolver.
    command = f"{APT}install --allow-change-held-packages " + " ".join(canonical_set("580"))
    sim = aptsim.simulate(tmp_path / "aptroot", base_and(held(C550)), command)
    assert sim.rc != 0 and "held" in sim.output


def test_canonical_580_to_590_moves_held_packages_and_reboots_once(tmp_path: Path) -> None:
    p = plan(FakeHost(U, driver="current"), {"llama_driver_branch": "590"})
    old = [n for n in names(CURRENT_580) if "580" in n]
    unhold = [n for n in names(CURRENT_580, held_only=True)]
    assert move(p) == expected_move(canonical_set("590"), old, unhold)
    reboots_once(p)
    sim = accepted(tmp_path, base_and(CURRENT_580), move(p))
    assert sim.acts("Purg") == old
    stack_590 = sim.applied(CURRENT_580.split("\n", 2)[2])
    assert not [n for n in names(stack_590) if "580" in n]
    rerun = plan(
        converged(stack_590, LOADED_590, "precompiled"),
        {"llama_driver_branch": "590"},
    )
    assert rerun.changes == []


def test_open_to_proprietary_moves_the_flavour_packages_only(tmp_path: Path) -> None:
    p = plan(FakeHost(U, driver="current"), {"llama_driver_flavour": "proprietary"})
    old = [
        f"linux-modules-nvidia-580-server-open-{K}",
        "linux-modules-nvidia-580-server-open-aws",
        f"linux-objects-nvidia-580-server-open-{K}",
        "nvidia-headless-no-dkms-580-server-open",
        "nvidia-kernel-source-580-server-open",  # the two flavours' sources conflict
    ]
    unhold = names(CURRENT_580, held_only=True)
    assert move(p) == expected_move(canonical_set("580", "-server"), sorted(old), unhold)
    reboots_once(p)
    sim = accepted(tmp_path, base_and(CURRENT_580), move(p))
    assert sim.acts("Purg") == sorted(old)
    # libnvidia-compute, nvidia-kernel-common, the firmware: shared by both flavours, kept.
    assert "libnvidia-compute-580-server" not in sim.acts("Purg")
    # The second run, over the state apt's answer leaves: nothing planned.
    proprietary = sim.applied(CURRENT_580.split("\n", 2)[2])
    assert "nvidia-kernel-source-580-server" in names(proprietary)
    rerun = plan(
        converged(proprietary, LOADED_580_PROP, "precompiled"),
        {"llama_driver_flavour": "proprietary"},
    )
    assert rerun.changes == []


# ---------------------------------------------------------------- NVIDIA's repository
@pytest.mark.parametrize("secure_boot", [False, True], ids=["sb-off", "sb-on-module-loads"])
def test_nvidias_repository_driver_on_ubuntu_stays_there(tmp_path: Path, secure_boot: bool) -> None:
    p = plan(foreign(NV580, LOADED_580_NV, "dkms", secure_boot=secure_boot))
    assert not p.has(MOVE_OP) and not p.has(REBOOT_OP)
    # No switch to Canonical's older 580.95.05: NVIDIA's branch pin, its packages kept.
    assert not p.has("Keep the driver on Canonical's packages")
    (pin,) = p.commands("Pin the driver to branch 580")
    assert pin.endswith("install --allow-change-held-packages nvidia-driver-pinning-580")
    accepted(tmp_path, base_and(NV580), pin)
    assert p.commands("NVIDIA driver 580 (open, dkms)") == ()
    assert p.has(HOLD_OP)
    # Converged: pinned, held, no Canonical pin: nothing.
    stack = NV580 + held(
        "ii  nvidia-driver-pinning-580                 580.105.08-1                   all"
        "          Pin NVIDIA driver packages to the 580 branch\n"
    )
    rerun = plan(converged(stack, LOADED_580_NV, "dkms", canonical_pin=False))
    assert rerun.changes == []


def test_nvidias_repository_to_canonical_only_when_asked(tmp_path: Path) -> None:
    p = plan(foreign(NV580, LOADED_580_NV, "dkms"), {"llama_driver_source": "canonical"})
    old = [n for n in names(NV580) if gpu.is_driver_package(n)]
    assert move(p) == expected_move(canonical_set("580"), old, [])
    reboots_once(p)
    sim = accepted(tmp_path, base_and(NV580), move(p))
    assert sim.acts("Purg") == old


# ---------------------------------------------------------------- Secure Boot
def test_secure_boot_with_precompiled_modules_for_the_running_abi(tmp_path: Path) -> None:
    p = plan(FakeHost(U, secure_boot=True))
    (command,) = p.commands("NVIDIA driver 580 (open, precompiled)")
    assert command.endswith(
        "install --allow-change-held-packages " + " ".join(canonical_set("580"))
    )
    reboots_once(p)
    accepted(tmp_path, fixture(f"dpkg-l-{U}-base.txt"), command)
    assert plan(FakeHost(U, driver="current", secure_boot=True)).changes == []


@pytest.mark.parametrize(
    ("host", "data"),
    [
        (FakeHost(U, secure_boot=True, abi_modules=False), {}),
        (FakeHost(U, secure_boot=True), {"llama_driver_kernel_modules": "dkms"}),
        (FakeHost(U, secure_boot=True), {"llama_driver_source": "nvidia"}),
        (FakeHost(U, secure_boot=True, abi_modules=False), {"llama_driver_branch": "590"}),
    ],
    ids=["no-modules-for-the-abi", "dkms-asked", "nvidia-repository", "590-no-modules"],
)
def test_secure_boot_refuses_dkms_before_any_change(host: FakeHost, data: dict[str, str]) -> None:
    with pytest.raises(PyinfraError) as exc:
        plan(host, data)
    message = str(exc.value)
    assert "Secure Boot is on" in message and "Nothing was changed" in message
    for remedy in ("kernel flavour", "disable Secure Boot", "mokutil --import"):
        assert remedy in message


def test_without_secure_boot_a_kernel_without_precompiled_modules_builds_with_dkms() -> None:
    p = plan(FakeHost(U, abi_modules=False))
    (command,) = p.commands("NVIDIA driver 580 (open, dkms)")
    assert command.endswith(
        "install --allow-change-held-packages nvidia-headless-580-server-open "
        f"nvidia-utils-580-server linux-headers-{K}"  # linux-headers-aws: installed
    )


def test_precompiled_asked_for_a_kernel_without_them_is_refused() -> None:
    with pytest.raises(PyinfraError) as exc:
        plan(FakeHost(U, abi_modules=False), {"llama_driver_kernel_modules": "precompiled"})
    assert f"no linux-modules-nvidia-580-server-open-{K}" in str(exc.value)


# ---------------------------------------------------------------- fresh installs
@pytest.mark.parametrize(
    ("data", "host", "loaded", "kind"),
    [
        ({}, {}, LOADED_580, "precompiled"),
        ({"llama_driver_flavour": "proprietary"}, {}, LOADED_580_PROP, "precompiled"),
        ({}, {"abi_modules": False}, LOADED_580, "dkms"),
        (
            {"llama_driver_flavour": "proprietary", "llama_driver_kernel_modules": "dkms"},
            {},
            LOADED_580_PROP,
            "dkms",
        ),
        ({"llama_driver_source": "nvidia"}, {"canonical_pin": False}, LOADED_580_NV, "dkms"),
    ],
    ids=[
        "canonical-open-precompiled",
        "canonical-proprietary-precompiled",
        "canonical-open-dkms",
        "canonical-proprietary-dkms",
        "nvidia-open-dkms",
    ],
)
def test_a_fresh_install_applied_then_rerun_plans_nothing(
    tmp_path: Path, data: dict[str, str], host: dict[str, bool], loaded: str, kind: str
) -> None:
    """Every fresh end state, derived rather than written by hand: each install the first
    run plans (the branch pin first where NVIDIA's repository is the source) handed to apt
    in turn over the modelled lists; the packages apt installed, held, are the second run's
    host, with the module that boots: nothing planned, no reboot."""
    p = plan(FakeHost(U, **host), data)  # type: ignore[arg-type]
    installs = [c for op in p.ops for c in op.commands if " install " in c and "nvidia" in c]
    assert installs, p.changes
    reboots_once(p)
    stack = ""
    for command in installs:
        stack = accepted(tmp_path, base_and(stack), command).applied(stack)
    assert stack, "apt installed nothing"
    keep = {"canonical_pin": host.get("canonical_pin", True)}
    rerun = plan(converged(stack, loaded, kind, **keep), data)
    assert rerun.changes == []
    assert rerun.result.reboot is not None and not rerun.result.reboot.needed
