"""Pure logic of llamahost/monitoring.py: settings, who is scraped at which address, files."""

from __future__ import annotations

from typing import Any

import pytest

from llamahost import layout
from llamahost.checks import ConfigError
from llamahost.config import SETTINGS
from llamahost.monitoring import exporters as ex
from llamahost.monitoring import scrape
from llamahost.monitoring import settings as msettings
from llamahost.spec import resolve_host
from tests.monitoring.names import yaml


def served(name: str, **data: Any) -> scrape.ServedHost:
    return scrape.served_host(resolve_host(name, {"llama_profile": "balanced", **data}))


def config(monitoring_host: str, hosts: list[scrape.ServedHost], **data: Any) -> dict[str, Any]:
    mon = resolve_host(monitoring_host, data).monitoring
    out: dict[str, Any] = yaml.safe_load(
        scrape.prometheus_yml(monitoring_host, mon, scrape.targets(monitoring_host, hosts))
    )
    return out


def jobs(cfg: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """job name -> (target, host label) pairs."""
    return {
        j["job_name"]: [
            (t, sc["labels"]["host"]) for sc in j["static_configs"] for t in sc["targets"]
        ]
        for j in cfg["scrape_configs"]
    }


def test_defaults() -> None:
    mon = resolve_host("h", {}).monitoring
    assert mon.monitoring_prometheus_host == "127.0.0.1"
    assert mon.monitoring_prometheus_port == 9090
    assert mon.monitoring_gpu_exporter_version == msettings.PINNED_GPU_EXPORTER_VERSION
    assert mon.monitoring_gpu_exporter_sha256 is None
    assert scrape.prometheus_args(mon) == (
        "--config.file=/etc/prometheus/prometheus.yml "
        "--web.listen-address=127.0.0.1:9090 --storage.tsdb.retention.time=15d"
    )


def test_settings_rows_have_the_config_shape() -> None:
    assert all(type(s) is type(SETTINGS[0]) for s in msettings.MONITORING_SETTINGS)
    assert all(s.key.startswith("monitoring_") and s.doc for s in msettings.MONITORING_SETTINGS)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("llama_monitoring_prometheus_port", 70000, "must be an integer from 1024 to 65535"),
        ("llama_monitoring_retention", "15 days", "must be a duration like 15s, 12h or 15d"),
        ("llama_monitoring_prometheus_host", "localhost", "must be an IPv4 or IPv6 address"),
        ("llama_monitoring_gpu_exporter_sha256", "ABC", "must be a sha256 in 64 lower-case"),
        ("llama_monitoring_address", "a b\nc", "must be a DNS name or an IP address"),
        ("llama_monitoring_scrape_interval", '15s"\n  x', "must be a duration"),
    ],
)
def test_bad_values_are_named(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_host("h", {key: value})
    assert "host 'h': invalid inventory data (nothing was changed)" in str(e.value)
    assert f"{key} = {value!r}: {message}" in str(e.value)


def test_llama_config_ignores_our_keys_until_config_knows_them() -> None:
    cfg = resolve_host("h", {"llama_monitoring_prometheus_port": 9999, "llama_port": 8081}).cfg
    assert cfg.profile.port == 8081
    with pytest.raises(ConfigError, match="llama_prot"):
        resolve_host("h", {"llama_prot": 1})


def test_every_llama_server_is_scraped_with_its_own_key() -> None:
    hosts = [
        served("mon", llama_profile="cpu-demo", llama_port=18081, ssh_hostname="127.0.0.1"),
        served("a100-01.example.internal"),
        served("a100-02", ssh_hostname="10.0.0.2"),
        served("a100-03", ssh_hostname="10.0.0.3", llama_monitoring_address="a100-03.lan"),
    ]
    cfg = config("mon", hosts)
    j = jobs(cfg)
    # The monitoring host scrapes itself over loopback, the others at their addresses.
    assert j["llama-server/mon"] == [("127.0.0.1:18081", "mon")]
    assert j["llama-server/a100-01.example.internal"] == [
        ("a100-01.example.internal:8080", "a100-01.example.internal")
    ]
    assert j["llama-server/a100-02"] == [("10.0.0.2:8080", "a100-02")]
    assert j["llama-server/a100-03"] == [("a100-03.lan:8080", "a100-03")]
    assert j["node"] == [
        ("127.0.0.1:9100", "mon"),
        ("a100-01.example.internal:9100", "a100-01.example.internal"),
        ("10.0.0.2:9100", "a100-02"),
        ("a100-03.lan:9100", "a100-03"),
    ]
    # GPU exporters on GPU hosts only.
    assert [h for _, h in j["nvidia-gpu"]] == ["a100-01.example.internal", "a100-02", "a100-03"]
    for sc in cfg["scrape_configs"]:
        if sc["job_name"].startswith("llama-server/"):
            host = sc["job_name"].split("/", 1)[1]
            assert sc["authorization"] == {
                "type": "Bearer",
                "credentials_file": scrape.key_file(host),
            }
            assert sc["relabel_configs"] == [{"target_label": "job", "replacement": "llama-server"}]


def test_a_removed_host_leaves_the_configuration() -> None:
    both = config("mon", [served("mon"), served("gone")])
    one = config("mon", [served("mon")])
    assert "llama-server/gone" in jobs(both)
    text = yaml.safe_dump(one)
    assert "gone" not in text


def test_without_gpu_hosts_there_is_no_gpu_job() -> None:
    cfg = config("mon", [served("mon", llama_profile="cpu-demo")])
    assert set(jobs(cfg)) == {"prometheus", "llama-server/mon", "node"}


def test_a_remote_server_on_loopback_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        scrape.targets("mon", [served("mon"), served("a100-01", llama_host="127.0.0.1")])
    assert "host 'a100-01'" in str(e.value)
    assert "llama_host = '127.0.0.1': llama-server listens on loopback only" in str(e.value)
    with pytest.raises(ConfigError, match="llama_monitoring_exporter_host = '::1'"):
        scrape.targets("mon", [served("a100-01", llama_monitoring_exporter_host="::1")])
    # On the monitoring host itself, loopback is fine.
    (t,) = scrape.targets(
        "mon", [served("mon", llama_host="::1", llama_monitoring_exporter_host="::")]
    )
    assert (t.llama, t.node) == ("[::1]:8080", "[::1]:9100")


def test_metrics_off_is_refused_when_monitored() -> None:
    with pytest.raises(
        ConfigError, match="llama_metrics = False: the inventory has a 'monitoring'"
    ):
        resolve_host(
            "a100-01", {"llama_metrics": False, "llama_profile": "cpu-demo"}, monitored=True
        )
    resolve_host("a100-01", {"llama_metrics": False, "llama_profile": "cpu-demo"})


def test_key_file_names_are_safe() -> None:
    assert (
        scrape.key_file("a100-01.example.internal")
        == f"{layout.KEYS_DIR}/a100-01.example.internal.key"
    )
    odd = scrape.key_file("../x y")
    assert odd.startswith(f"{layout.KEYS_DIR}/") and "/" not in odd[len(layout.KEYS_DIR) + 1 :]
    assert scrape.key_file("a/b") != scrape.key_file("a_b")


def test_gpu_exporter_needs_its_sha256() -> None:
    # Only where a `monitoring` group scrapes a GPU host: refused by the spec, like any field.
    resolve_host("a100-01", {"llama_profile": "balanced"})
    resolve_host("cpu-01", {"llama_profile": "cpu-demo"}, monitored=True)
    with pytest.raises(ConfigError) as e:
        resolve_host("a100-01", {"llama_profile": "balanced"}, monitored=True)
    assert "llama_monitoring_gpu_exporter_sha256 = None: required on a GPU host" in str(e.value)
    assert "checksums.txt of release v1.14.0" in str(e.value)
    sha = "ab" * 32
    mon = resolve_host("a100-01", {"llama_monitoring_gpu_exporter_sha256": sha}).monitoring
    exp = ex.gpu_exporter(mon)
    assert exp.url == (
        "https://github.com/utkuozdemir/nvidia_gpu_exporter/releases/download/"
        "v1.14.0/nvidia_gpu_exporter-nvml_1.14.0_linux_x86_64.tar.gz"
    )
    assert exp.binary == f"{layout.GPU_EXPORTER_PREFIX}/1.14.0-{sha[:12]}/nvidia_gpu_exporter"
    assert ex.gpu_exporter_args(exp) == [
        "--web.listen-address=0.0.0.0:9835",
        "--collect.backend=nvml",
    ]


def test_model_filesystem_textfile_escapes_labels() -> None:
    text = ex.model_filesystem_textfile("/var/lib/llama-models", '/mnt/"odd"\\dir')
    assert text.endswith(
        'llamahost_model_filesystem_info{model_dir="/var/lib/llama-models",'
        'mountpoint="/mnt/\\"odd\\"\\\\dir"} 1\n'
    )
