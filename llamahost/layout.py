"""Where everything lives: every host path, unit and file name the deploy writes, and the
repository's own files it reads. Defined once; the tasks, the renderer and the compliance
checks all take them from here. Pure: imports nothing from the package.

Paths that a setting chooses (``llama_model_dir``, ``llama_cpp_prefix``,
``llama_api_key_file``, ``llama_hf_venv``) are arguments of the functions below.
"""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------- the controller's side
REPO = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = REPO / "templates"
FILES_DIR = REPO / "files"
# Built llama.cpp trees, one archive per build id, unless llama_cpp_build_cache says where.
BUILD_CACHE = REPO / ".cache" / "builds"

# ---------------------------------------------------------------- toolkit-owned host paths
TOOLKIT_DIR = "/opt/llamahost"
BIN_DIR = f"{TOOLKIT_DIR}/bin"
HEALTH_SCRIPT = f"{BIN_DIR}/llama-wait-healthy"
FETCH_SCRIPT = f"{BIN_DIR}/llama-fetch-model"
BUILD_SCRIPT = f"{BIN_DIR}/llama-build"
LOG_DIR = "/var/log/llamahost"
DOWNLOAD_LOG = f"{LOG_DIR}/model-download.log"
RUNTIME_DIR = "/run/llamahost"  # root-only, gone at reboot
TOKEN_FILE = f"{RUNTIME_DIR}/hf-token"
# Downloads that must survive a reboot (/tmp does not), so a rerun finds them.
CACHE_DIR = "/var/cache/llamahost"

# ---------------------------------------------------------------- systemd
SYSTEMD_DIR = "/etc/systemd/system"
UNIT = "llama-server.service"
UNIT_PATH = f"{SYSTEMD_DIR}/{UNIT}"
PERSISTENCED_UNIT = "nvidia-persistenced.service"
PERSISTENCED_DROPIN = f"{SYSTEMD_DIR}/{PERSISTENCED_UNIT}.d/llamahost.conf"

# ---------------------------------------------------------------- the GPU stack's files
NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
# Files whose names sort first so that they win over the CUDA repository's pin file.
CANONICAL_DRIVER_PIN = "/etc/apt/preferences.d/00-llamahost-nvidia-driver-from-canonical"

# ---------------------------------------------------------------- monitoring, served hosts
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # Debian's node exporter default
MODEL_FS_TEXTFILE = f"{TEXTFILE_DIR}/llamahost.prom"
NODE_EXPORTER = "prometheus-node-exporter.service"
NODE_EXPORTER_DEFAULTS = "/etc/default/prometheus-node-exporter"
GPU_EXPORTER_PREFIX = f"{TOOLKIT_DIR}/nvidia-gpu-exporter"
GPU_EXPORTER_UNIT = "nvidia-gpu-exporter.service"
GPU_EXPORTER_UNIT_PATH = f"{SYSTEMD_DIR}/{GPU_EXPORTER_UNIT}"

# ---------------------------------------------------------------- monitoring hosts
PROMETHEUS = "prometheus.service"
PROMETHEUS_DEFAULTS = "/etc/default/prometheus"
PROMETHEUS_DIR = "/etc/prometheus"
PROMETHEUS_CONFIG = f"{PROMETHEUS_DIR}/prometheus.yml"
RULES_NAME = "llama-server.rules.yml"
RULES_PATH = f"{PROMETHEUS_DIR}/rules/{RULES_NAME}"
# The config refers to its rules by a relative path, so a staged copy is validated with the
# staged rules and the live copy loads the live ones.
RULES_REF = f"rules/{RULES_NAME}"
STAGE_DIR = f"{PROMETHEUS_DIR}/llamahost/staged"
KEYS_DIR = f"{PROMETHEUS_DIR}/llamahost/keys"
RULES_FILE = FILES_DIR / "monitoring" / RULES_NAME
DASHBOARD_FILE = FILES_DIR / "monitoring" / "llama-server-dashboard.json"


# ---------------------------------------------------------------- paths a setting chooses
def model_path(model_dir: str, repo: str, revision: str, file: str) -> str:
    """Where a served file lives: one directory per repository and revision, so a change
    of any of them is a new path (a new unit, a restart)."""
    owner, name = repo.split("/")
    return f"{model_dir}/{owner}--{name}/{revision}/{file}"


def model_sidecar(path: str) -> str:
    """The verification record the fetch script writes beside a verified model."""
    return path + ".sha256"


def cpp_archive(prefix: str, commit: str) -> str:
    return f"{prefix}/src/llama.cpp-{commit}.tar.gz"


def cpp_build_root(prefix: str, build_id: str) -> str:
    return f"{cpp_builds(prefix)}/{build_id}"


def cpp_current(prefix: str) -> str:
    return f"{prefix}/current"


def cpp_previous(prefix: str) -> str:
    """The build `current` pointed at before it last moved: kept for a rollback."""
    return f"{prefix}/previous"


def cpp_builds(prefix: str) -> str:
    return f"{prefix}/builds"


def cpp_incoming(prefix: str, archive_name: str) -> str:
    """Where a pushed build archive lands (and the builder packs its own), removed once
    unpacked or fetched."""
    return f"{prefix}/incoming/{archive_name}"


def server_binary(prefix: str) -> str:
    """What the unit runs: the binary of the build `current` points at."""
    return f"{cpp_current(prefix)}/bin/llama-server"


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


# The gateway (HAProxy on the hosts of group `gateway`): Debian's and Ubuntu's paths.
HAPROXY = "haproxy.service"
HAPROXY_CONFIG = "/etc/haproxy/haproxy.cfg"
HAPROXY_ADMIN_SOCKET = "/run/haproxy/admin.sock"
GATEWAY_DIR = "/etc/haproxy/llamahost"  # root:haproxy 0750: the secrets below
GATEWAY_PEM = f"{GATEWAY_DIR}/tls.pem"  # certificate chain and key
GATEWAY_CLIENTS_MAP = f"{GATEWAY_DIR}/client-keys.map"  # client key -> client name
GATEWAY_BACKEND_KEYS_MAP = f"{GATEWAY_DIR}/backend-keys.map"  # server -> its API key
GATEWAY_STAGED_CONFIG = f"{GATEWAY_DIR}/haproxy.cfg.staged"
# The per-host proxies' sockets: bound before HAProxy enters its chroot (the full path),
# connected to from inside it (the path in the chroot). haproxy:haproxy 0700.
HAPROXY_CHROOT = "/var/lib/haproxy"
GATEWAY_SOCKETS_IN_CHROOT = "/llamahost"
GATEWAY_SOCKETS_DIR = HAPROXY_CHROOT + GATEWAY_SOCKETS_IN_CHROOT
# The local peer (the stick tables handed from the old process to the new one at a reload)
# listens in the same 0700 directory. The old process connects to it from inside the chroot
# by the full path it was bound at, which a link in the chroot leads back to the directory.
GATEWAY_PEERS_SOCKET = f"{GATEWAY_SOCKETS_DIR}/peers.sock"
GATEWAY_SOCKETS_LINK = HAPROXY_CHROOT + GATEWAY_SOCKETS_DIR  # -> GATEWAY_SOCKETS_IN_CHROOT
# The served hosts' firewall (llama_firewall): an nftables table of the toolkit's own, loaded
# by a unit of its own (Debian's nftables.service would flush every other table).
FIREWALL_UNIT = "llamahost-firewall.service"
FIREWALL_TABLE = "llamahost"  # table inet llamahost
FIREWALL_DIR = "/etc/llamahost"
FIREWALL_RULES = f"{FIREWALL_DIR}/firewall.nft"
FIREWALL_STAGED = f"{FIREWALL_DIR}/firewall.nft.staged"
# A restart the deploy owes llama-server (its inputs changed, the restart has not yet run):
# kept until it succeeds, so a rollout stopped midway resumes on the next run.
RESTART_PENDING = "/var/lib/llamahost/llama-server.restart-pending"
# A host with several llama-servers (llamahost/instances.py): the template unit, and each
# instance's drop-in with what it has of its own.
TEMPLATE_UNIT = "llama-server@.service"
TEMPLATE_UNIT_PATH = f"{SYSTEMD_DIR}/{TEMPLATE_UNIT}"


def instance_dropin_dir(unit: str) -> str:
    return f"{SYSTEMD_DIR}/{unit}.d"


def instance_dropin(unit: str) -> str:
    return f"{instance_dropin_dir(unit)}/instance.conf"


def restart_pending(unit: str) -> str:
    """The restart the deploy owes one llama-server unit (RESTART_PENDING for the single
    one)."""
    return f"{parent(RESTART_PENDING)}/{unit.removesuffix('.service')}.restart-pending"


# On a gateway: one empty file per server the deploy has drained and not yet put back, so
# that a run that died midway is repaired by the next (tasks/gateway.repair_left_drained).
GATEWAY_DRAINED_DIR = "/var/lib/llamahost/drained"
# A new TLS certificate and key (supplied or self-signed): written here first, checked with
# `haproxy -c` against the gateway's configuration pointing at it (the check configuration
# below), and only then renamed over GATEWAY_PEM. Same directory, so the rename is atomic.
GATEWAY_STAGED_PEM = f"{GATEWAY_DIR}/tls.pem.staged"
GATEWAY_PEM_CHECK_CONFIG = f"{GATEWAY_DIR}/haproxy.cfg.tls-check"
# The gateway certificate's expiry for the node exporter (monitored inventories): a script
# run by a timer on the gateway writes the textfile.
TLS_EXPIRY_SCRIPT = f"{BIN_DIR}/llamahost-tls-expiry"
TLS_EXPIRY_TEXTFILE = f"{TEXTFILE_DIR}/llamahost-tls.prom"
TLS_EXPIRY_UNIT = "llamahost-tls-expiry.service"
TLS_EXPIRY_TIMER = "llamahost-tls-expiry.timer"
