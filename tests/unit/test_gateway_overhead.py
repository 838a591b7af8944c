"""The overhead benchmark's HAProxy configurations (tests/bench/gateway_overhead.py) load,
and the production step is the rendered configuration pointed at the local llama-server:
the benchmark measures what the deploy renders, step by step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.bench import gateway_overhead as ov
from tests.unit.test_gateway import HAPROXY


@HAPROXY
@pytest.mark.parametrize("step", ov.STEPS[1:-1])
def test_each_steps_configuration_loads(step: str, tmp_path: Path) -> None:
    ov.make_cert(tmp_path, "deploy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(ov.step_config(step, 18001, 18000, tmp_path / "tls.pem", tmp_path))
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = cfg.read_text()
    assert (" ssl crt " in text) == (step != "http")
    assert ("http-buffer-request" in text) == (step in ("buffer", "two-hops"))
    assert ("unix@" in text) == (step == "two-hops")


@HAPROXY
def test_the_production_step_is_the_rendered_configuration(tmp_path: Path) -> None:
    cfg = ov.gateway_config(tmp_path, 18443, 18000)
    ov.make_cert(tmp_path, "deploy")
    text = cfg.read_text()
    assert "server a 127.0.0.1:18000 check" in text and "bind 127.0.0.1:18443 ssl" in text
    assert "map_str(" in text and "sha2(256)" in text  # the client-key map, as deployed
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_deploys_self_signed_key_is_ecdsa(tmp_path: Path) -> None:
    ov.make_cert(tmp_path, "deploy")
    r = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "c")],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert "id-ecPublicKey" in r.stdout and "prime256v1" in r.stdout
