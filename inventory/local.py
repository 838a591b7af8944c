"""The local test host: a Debian 12 systemd-nspawn machine on this computer (make demo).

Created by `python -m tests.support.testhost create NAME --ssh-port PORT`; pyinfra reaches
it over SSH like any VM, checking its host key. Environment variables let the tests run
several hosts side by side; the defaults are the demo's.
"""

import os
from pathlib import Path

from llamahost.config import PINNED_LLAMA_CPP_COMMIT

_REPO = Path(__file__).resolve().parents[1]
_CACHE = Path(os.environ.get("LLAMAHOST_CACHE", _REPO / ".cache"))
_NAME = os.environ.get("LLAMAHOST_LOCAL_HOST", "demo")
_HOST_DIR = _CACHE / "hosts" / _NAME
# LLAMAHOST_LOCAL_MONITORING=1 puts the host in group `monitoring`: it runs Prometheus too.
_MONITORING = os.environ.get("LLAMAHOST_LOCAL_MONITORING") == "1"
# LLAMAHOST_LOCAL_GATEWAY=1 puts the host in group `gateway` too: HAProxy in front of its own
# llama-server, TLS on LLAMAHOST_LOCAL_GATEWAY_PORT (8443) of 127.0.0.1, the client keys
# from LLAMAHOST_LOCAL_CLIENT_KEYS (`make demo` writes .cache/demo/clients).
_GATEWAY = os.environ.get("LLAMAHOST_LOCAL_GATEWAY") == "1"
# LLAMAHOST_LOCAL_SSH_USER=admin logs in as the host's unprivileged user with its own key
# and runs everything through sudo, as inventory/prod.py reaches a cloud image; unset (or
# root): root over SSH.
_USER = os.environ.get("LLAMAHOST_LOCAL_SSH_USER") or "root"
_LOGIN = (
    {"ssh_user": "root", "ssh_key": str(_HOST_DIR / "id_ed25519")}
    if _USER == "root"
    else {"ssh_user": _USER, "ssh_key": str(_HOST_DIR / f"{_USER}_ed25519"), "_sudo": True}
)

hosts = [
    (
        _NAME,
        {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": int(os.environ.get("LLAMAHOST_LOCAL_SSH_PORT", "2222")),
            **_LOGIN,
            "ssh_known_hosts_file": str(_HOST_DIR / "known_hosts"),
            "ssh_strict_host_key_checking": "yes",
            # A CPU host serving the tiny test model from the local Hub endpoint.
            "llama_profile": "cpu-demo",
            "llama_port": int(os.environ.get("LLAMAHOST_LOCAL_PORT", "8080")),
            "llama_model_repo": "llamahost/tiny-seed-oss-GGUF",
            "llama_model_file": "tiny-seed-oss.gguf",
            "llama_hf_endpoint": os.environ.get("LLAMAHOST_LOCAL_HUB", "http://127.0.0.1:18900"),
            # No internet beyond package registries: upload the source archive.
            "llama_cpp_source": "archive",
            "llama_cpp_archive": str(_CACHE / f"llama.cpp-{PINNED_LLAMA_CPP_COMMIT}.tar.gz"),
            # Built trees cached per local host (removed with it), unless the tests name the
            # session's cache; a real fleet shares .cache/builds.
            "llama_cpp_build_cache": os.environ.get("LLAMAHOST_LOCAL_BUILD_CACHE")
            or str(_HOST_DIR / "build-cache"),
            # The model lock (make lock INVENTORY=inventory/local.py), when one is wanted.
            "llama_model_lock": os.environ.get("LLAMAHOST_LOCAL_LOCK") or None,
            # A token for gated repositories comes from the environment, never from here;
            # so does a supplied API key (unset: the host generates one).
            "llama_hf_token": os.environ.get("LLAMAHOST_LOCAL_HF_TOKEN") or None,
            "llama_api_key": os.environ.get("LLAMAHOST_LOCAL_API_KEY") or None,
            # `make demo` serves two llama-servers (llama-server@0 and @1 on 8080 and 8081)
            # behind its gateway, so that a rolling change can be watched on one host.
            "llama_instances": int(os.environ.get("LLAMAHOST_LOCAL_INSTANCES", "1")),
            # `make demo-roll TEMP=...`: a sampling change to watch.
            **(
                {"llama_temp": float(os.environ["LLAMAHOST_LOCAL_TEMP"])}
                if os.environ.get("LLAMAHOST_LOCAL_TEMP")
                else {}
            ),
            **(
                {
                    "llama_monitoring_prometheus_port": int(
                        os.environ.get("LLAMAHOST_LOCAL_PROMETHEUS_PORT", "9090")
                    ),
                    "llama_monitoring_node_exporter_port": int(
                        os.environ.get("LLAMAHOST_LOCAL_NODE_EXPORTER_PORT", "9100")
                    ),
                    # The host shares this machine's network: exporters on loopback only.
                    "llama_monitoring_exporter_host": "127.0.0.1",
                    "llama_monitoring_scrape_interval": "5s",
                }
                if _MONITORING
                else {}
            ),
            **(
                {
                    "llama_gateway_listen": "127.0.0.1",
                    "llama_gateway_port": int(
                        os.environ.get("LLAMAHOST_LOCAL_GATEWAY_PORT", "8443")
                    ),
                    "llama_gateway_client_keys_file": os.environ.get(
                        "LLAMAHOST_LOCAL_CLIENT_KEYS", str(_CACHE / "demo" / "clients")
                    ),
                    # The local host shares this machine's network: a firewall table there
                    # would filter the machine itself (the run warns that it is off).
                    "llama_firewall": False,
                }
                if _GATEWAY
                else {}
            ),
        },
    )
]

# Hosts that are scraped but never deployed (the tests run with --limit): a host removed
# from the inventory must leave Prometheus's targets.
for _extra in filter(None, os.environ.get("LLAMAHOST_LOCAL_EXTRA_HOSTS", "").split(",")):
    hosts.append(
        (
            _extra,
            {
                "ssh_hostname": "127.0.0.1",
                "ssh_port": 1,
                "llama_profile": "cpu-demo",
                "llama_port": 1025,  # nothing listens there
                # A remote host must not listen on loopback only (it could not be scraped).
                "llama_monitoring_exporter_host": "0.0.0.0",  # noqa: S104
            },
        )
    )

monitoring = [_NAME] if _MONITORING else []
gateway = [_NAME] if _GATEWAY else []
