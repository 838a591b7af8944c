"""The gateway's settings, client keys, HAProxy configuration and runtime API answers."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from llamahost.checks import ConfigError, Invalid
from llamahost.fleet import inventory_specs
from llamahost.gateway import haproxy as hx
from llamahost.gateway import settings as gateway_settings
from llamahost.gateway.clients import client_map, digest, parse_client_keys
from llamahost.gateway.settings import haproxy_time
from llamahost.spec import HostSpec, resolve_host
from tests.support import rotation, sse_backend

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice-key-0123456789abcdef0123456789"
BOB = "bob-key-0123456789abcdef0123456789ab"
CAROL = "carol-key-0123456789abcdef0123456789"  # a second client of the live gateways


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "clients"
    p.write_text(f"# team keys\nalice {ALICE}\n\nbob {BOB}\n")
    p.chmod(0o600)
    return p


def gateway_data(keys_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "ssh_hostname": "10.0.0.1",
        "llama_profile": "cpu-demo",
        "llama_gateway_client_keys_file": str(keys_file),
        **extra,
    }


def spec(name: str, data: dict[str, Any], gateway: bool = False) -> HostSpec:
    return resolve_host(name, data, is_gateway=gateway)


def refused(name: str, data: dict[str, Any], gateway: bool = True) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        spec(name, data, gateway)
    assert e.value.host == name
    return {err.key: err.allowed for err in e.value.errors}


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("llama_gateway_affinity_header", "X Session", "HTTP header name"),
        ("llama_gateway_affinity_header", "X-Session\nX-Evil: 1", "HTTP header name"),
        ("llama_rolling_max_unavailable", 0, "from 1 to"),
        ("llama_gateway_queue_timeout", "30", "a duration like"),
        ("llama_gateway_port", 70000, "from 1 to 65535"),
        ("llama_gateway_listen", "gateway.example", "IPv4 or IPv6"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(
    keys_file: Path, key: str, value: Any, says: str
) -> None:
    errors = refused("gw1", gateway_data(keys_file, **{key: value}))
    assert says in errors[key]


def test_a_gateway_needs_client_keys(keys_file: Path) -> None:
    data = gateway_data(keys_file)
    del data["llama_gateway_client_keys_file"]
    assert (
        "required on a host of group 'gateway'"
        in refused("gw1", data)["llama_gateway_client_keys_file"]
    )
    # A served host that is not a gateway needs none.
    assert spec("a", data).gateway.gateway_client_keys_file is None


def test_a_keys_file_readable_by_others_or_missing_is_refused(keys_file: Path) -> None:
    keys_file.chmod(0o644)
    why = refused("gw1", gateway_data(keys_file))["llama_gateway_client_keys_file"]
    assert "readable by others (mode 0644)" in why and "chmod 600" in why
    keys_file.chmod(0o640)
    assert spec("gw1", gateway_data(keys_file), gateway=True).is_gateway
    missing = gateway_data(keys_file, llama_gateway_client_keys_file="/nonexistent/keys")
    assert (
        "not found on the controller" in refused("gw1", missing)["llama_gateway_client_keys_file"]
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("alice\n", "line 1: must be `NAME KEY`"),
        ("al ice key-0123456789abcdef\n", "line 1: must be `NAME KEY`"),
        ("alice short\n", "line 1 (alice): the key must be 16-256"),
        (f"alice {ALICE}\nalice {BOB}\nalice {BOB}x\n", "line 3: client 'alice' is listed 3"),
        (f"alice {ALICE}\nbob {ALICE}\n", "line 2 (bob): the same key"),
        ("# nobody\n", "lists no client"),
    ],
)
def test_a_bad_keys_file_is_refused_without_showing_a_key(
    keys_file: Path, text: str, says: str
) -> None:
    keys_file.write_text(text)
    why = refused("gw1", gateway_data(keys_file))["llama_gateway_client_keys_file"]
    assert says in why
    assert ALICE not in why and BOB not in why


def test_tls_files_come_in_pairs_and_must_exist(keys_file: Path, tmp_path: Path) -> None:
    half = gateway_data(keys_file, llama_gateway_tls_cert="certs/gw.pem")
    assert "set both" in refused("gw1", half)["llama_gateway_tls_key"]
    both = gateway_data(
        keys_file,
        llama_gateway_tls_cert=str(tmp_path / "none.crt"),
        llama_gateway_tls_key=str(tmp_path / "none.key"),
    )
    errors = refused("gw1", both)
    assert "not found on the controller" in errors["llama_gateway_tls_cert"]
    assert "not found on the controller" in errors["llama_gateway_tls_key"]


@pytest.mark.parametrize(
    ("value", "seconds"), [("600s", 600), ("10m", 600), ("1h", 3600), ("500ms", 0.5), ("30s", 30)]
)
def test_haproxy_times_in_seconds(value: str, seconds: float) -> None:
    assert haproxy_time(value) == value
    assert gateway_settings.seconds(value) == seconds


@pytest.mark.parametrize("value", ["600", "1d", "s", "1.5s", "", "10 m", "5sm", "٣s"])
def test_what_is_no_haproxy_time_has_no_seconds(value: str) -> None:
    with pytest.raises(ValueError, match="not an HAProxy time"):
        gateway_settings.seconds(value)


def _fleet(keys_file: Path, served: dict[str, Any], gw: dict[str, Any]) -> list[ConfigError]:
    a = {"ssh_hostname": "10.0.0.2", "llama_profile": "cpu-demo", **served}
    hosts = [("a", a, []), ("gw", gateway_data(keys_file, llama_serve=False, **gw), ["gateway"])]
    specs, errors = inventory_specs(hosts)
    assert {s.name for s in specs} | {e.host for e in errors} == {"a", "gw"}
    return errors


def test_the_drain_covers_the_gateways_server_timeout(keys_file: Path) -> None:
    """A drain shorter than the longest answer a gateway waits for would restart a host
    under answers in flight: refused, by default they agree."""
    assert _fleet(keys_file, {}, {}) == []  # 600 and "600s"
    (e,) = _fleet(keys_file, {"llama_rolling_drain_timeout": 300}, {})
    assert e.host == "a" and [err.key for err in e.errors] == ["llama_rolling_drain_timeout"]
    assert str(e.errors[0]).startswith("llama_rolling_drain_timeout = 300: must be at least 600")
    assert "the gateway 'gw' waits up to llama_gateway_server_timeout = 600s" in str(e)
    (e,) = _fleet(keys_file, {}, {"llama_gateway_server_timeout": "15m"})
    assert "must be at least 900 seconds" in str(e)
    assert _fleet(keys_file, {"llama_rolling_drain_timeout": 900},
                  {"llama_gateway_server_timeout": "15m"}) == []  # fmt: skip
    assert _fleet(keys_file, {"llama_rolling_drain_timeout": 1},
                  {"llama_gateway_server_timeout": "500ms"}) == []  # fmt: skip
    # Without gateways nothing drains: no check.
    data = {
        "ssh_hostname": "10.0.0.2",
        "llama_profile": "cpu-demo",
        "llama_rolling_drain_timeout": 1,
    }
    alone: list[tuple[str, dict[str, Any], list[str]]] = [("a", data, [])]
    assert inventory_specs(alone)[1] == []


def test_checks_across_hosts_wait_for_the_gateways_own_errors(keys_file: Path) -> None:
    """A firewall is refused for a gateway known by name; with the gateway itself invalid,
    only its own errors are reported (no misleading "needs a gateway group")."""
    (e,) = _fleet(keys_file, {"llama_firewall": True}, {"ssh_hostname": "gw.example"})
    assert e.host == "a" and "'gw' is known by the name 'gw.example'" in str(e)
    (e,) = _fleet(keys_file, {"llama_firewall": True}, {"llama_gateway_port": 0})
    assert e.host == "gw" and "llama_gateway_port" in str(e)


def test_a_client_may_hold_two_keys_while_it_rotates() -> None:
    clients = parse_client_keys(f"alice {ALICE}\nalice {BOB}\n")
    assert [c.name for c in clients] == ["alice", "alice"]
    a, b = (hashlib.sha256(k.encode()).hexdigest().upper() for k in (ALICE, BOB))
    assert client_map(clients).reveal() == f"{a} alice\n{b} alice\n"


def test_client_keys_parse_and_never_show() -> None:
    clients = parse_client_keys(f"alice {ALICE}\nbob {BOB}\n")
    assert [c.name for c in clients] == ["alice", "bob"]
    assert ALICE not in repr(clients) and ALICE not in str(client_map(clients))
    # On the gateway a key is only its sha256 (HAProxy's sha2(256),hex: upper-case hex).
    kept = client_map(clients).reveal()
    assert ALICE not in kept and BOB not in kept
    assert kept == f"{digest(ALICE)} alice\n{digest(BOB)} bob\n"
    assert digest("abc") == "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
    with pytest.raises(Invalid):
        parse_client_keys("")


def test_a_client_key_shorter_than_32_characters_is_refused(keys_file: Path) -> None:
    short = "sixteen-chars-ok"
    with pytest.raises(Invalid, match="at least 32 characters \\(this one has 16\\)") as e:
        parse_client_keys(f"alice {ALICE}\nbob {short}\n")
    assert short not in str(e.value) and "line 2 (bob)" in str(e.value)
    keys_file.write_text(f"alice {ALICE}\nbob {short}\n")
    why = refused("gw1", gateway_data(keys_file))["llama_gateway_client_keys_file"]
    assert "at least 32 characters" in why and short not in why


def test_the_conversation_id_cannot_carry_affinity(keys_file: Path) -> None:
    why = refused("gw1", gateway_data(keys_file, llama_gateway_affinity_header="x-conversation-id"))
    assert "never forwards X-Conversation-Id" in why["llama_gateway_affinity_header"]


@pytest.mark.parametrize(
    ("setting", "slots", "limit"),
    [("auto", [2, 4], 3), ("auto", [1], 1), (5, [2, 4], 5), (0, [2], 0)],
)
def test_in_flight_per_key_defaults_to_half_the_slots(
    keys_file: Path, setting: Any, slots: list[int], limit: int
) -> None:
    g = spec("gw", gateway_data(keys_file, llama_gateway_max_in_flight=setting), gateway=True)
    servers = [hx.Server(f"h{i}", f"h{i}", f"10.0.0.{i}:8080", n) for i, n in enumerate(slots)]
    assert hx.max_in_flight(g.gateway, servers) == limit
    cfg = hx.haproxy_cfg("gw", g.gateway, servers)
    assert ("sc_trackers(0) gt" in cfg) == (limit > 0)


@pytest.mark.parametrize("value", ["half", -1, 100_001, True])
def test_a_bad_in_flight_limit_is_refused(keys_file: Path, value: Any) -> None:
    why = refused("gw1", gateway_data(keys_file, llama_gateway_max_in_flight=value))
    assert "auto, or an integer from 0 to 100000" in why["llama_gateway_max_in_flight"]


# ---------------------------------------------------------------- configuration
def fleet(keys_file: Path, **gw: Any) -> tuple[HostSpec, list[HostSpec]]:
    every = "0.0.0.0"  # noqa: S104  (served hosts listen where the gateway reaches them)
    a = {"ssh_hostname": "10.0.0.1", "llama_profile": "cpu-demo", "llama_host": every}
    b = {**a, "ssh_hostname": "10.0.0.2", "llama_parallel": 4, "llama_port": 8081}
    served = [spec("a", a), spec("b.example", b)]
    return spec("gw", gateway_data(keys_file, **gw), gateway=True), served


def render(keys_file: Path, **gw: Any) -> str:
    g, served = fleet(keys_file, **gw)
    return hx.haproxy_cfg("gw", g.gateway, hx.servers("gw", served))


def test_every_served_host_is_a_server_with_maxconn_its_slots(keys_file: Path) -> None:
    cfg = render(keys_file)
    assert "balance leastconn" in cfg
    assert "server a unix@/llamahost/a.sock maxconn 2 track llamahost-a/a" in cfg
    assert "server b.example unix@/llamahost/b.example.sock maxconn 4 track" in cfg
    # Bound before the chroot, at the full path, in HAProxy's own directory.
    assert "bind unix@/var/lib/haproxy/llamahost/a.sock user haproxy group haproxy mode 600" in cfg
    # Each host's health is checked on the host itself, and a refused connection takes it
    # out at once.
    assert "server a 10.0.0.1:8080 check" in cfg and "server b.example 10.0.0.2:8081 check" in cfg
    assert cfg.count("observe layer4 error-limit 1 on-error mark-down") == 2
    assert "timeout queue 30s" in cfg and "hdr Retry-After 5" in cfg
    assert "ssl-min-ver TLSv1.2" in cfg and "sc_http_req_rate(0) gt 600" in cfg
    assert ALICE not in cfg and BOB not in cfg


def test_affinity_hashes_on_the_header(keys_file: Path) -> None:
    cfg = render(keys_file, llama_gateway_affinity_header="X-Session-Id")
    assert "balance hdr(X-Session-Id)\n    hash-type consistent" in cfg
    assert "leastconn" not in cfg
    off = render(keys_file, llama_gateway_rate_limit=0, llama_gateway_max_in_flight=0)
    assert "track-sc0" not in off
    assert "track-sc0" in render(keys_file, llama_gateway_rate_limit=0)  # in flight: auto


def test_a_loopback_server_the_gateway_cannot_reach_is_refused(keys_file: Path) -> None:
    lo = spec("a", {"ssh_hostname": "10.0.0.1", "llama_profile": "cpu-demo",
                    "llama_host": "127.0.0.1"})  # fmt: skip
    with pytest.raises(ConfigError) as e:
        hx.servers("gw", [lo])
    assert e.value.host == "a" and "cannot reach it" in str(e.value)
    # The gateway itself reaches its own loopback; hosts reached at a loopback address
    # share the gateway's network (the test fleet).
    assert hx.servers("a", [lo])[0].address == "127.0.0.1:8080"
    same = spec("c", {"ssh_hostname": "127.0.0.1", "llama_profile": "cpu-demo",
                      "llama_host": "127.0.0.1"})  # fmt: skip
    assert hx.servers("gw", [same])[0].address == "127.0.0.1:8080"


def test_a_host_that_serves_nothing_must_have_a_role(keys_file: Path) -> None:
    bad = refused("gw", gateway_data(keys_file, llama_serve=False), gateway=False)
    assert "must be in group `gateway` or `monitoring`" in bad["llama_serve"]
    gw = spec("gw", gateway_data(keys_file, llama_serve=False), gateway=True)
    assert not gw.serves and gw.lock.path is None
    mon = resolve_host("m", {"ssh_hostname": "10.0.0.9", "llama_serve": False},
                       is_monitoring=True)  # fmt: skip
    assert not mon.serves


def test_a_gateway_with_no_served_host_is_refused(keys_file: Path) -> None:
    with pytest.raises(ConfigError) as e:
        hx.servers("gw", [])
    assert e.value.host == "gw" and e.value.errors[0].key == "group gateway"
    assert "no served host" in e.value.errors[0].allowed


def test_server_names_are_safe_for_haproxy() -> None:
    assert hx.server_name("gpu-01.example") == "gpu-01.example"
    odd = hx.server_name("user@host:22")
    assert odd.startswith("user_host_22-") and odd != hx.server_name("user@host_22")
    with pytest.raises(ValueError):
        hx.set_state("a b", "drain")
    assert hx.set_state("a", "drain") == "set server llama/a state drain"


HAPROXY = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (make sysdeps installs it)"
)


CHROOT_AND_USER = ("chroot /var/lib/haproxy", "user haproxy", "group haproxy", "daemon")


def local_config(cfg: str, tmp_path: Path, backend_key: str = BOB) -> Path:
    """The rendered configuration with its host paths moved under tmp_path, its certificate
    and maps written there: runnable by an unprivileged HAProxy on this machine."""
    for real in ("/etc/haproxy/llamahost/tls.pem", "/etc/haproxy/llamahost/client-keys.map",
                 "/etc/haproxy/llamahost/backend-keys.map", "/run/haproxy/admin.sock"):  # fmt: skip
        cfg = cfg.replace(real, str(tmp_path / Path(real).name))
    cfg = "\n".join(line for line in cfg.splitlines() if line.strip() not in CHROOT_AND_USER)
    # Without the chroot, the per-host sockets are where they are bound.
    sockets = tmp_path / "sockets"
    sockets.mkdir(exist_ok=True)
    cfg = cfg.replace("/var/lib/haproxy/llamahost/", f"{sockets}/")
    cfg = cfg.replace("unix@/llamahost/", f"unix@{sockets}/")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp_path / "k"), "-out", str(tmp_path / "c")],
        check=True, capture_output=True,
    )  # fmt: skip
    (tmp_path / "tls.pem").write_text((tmp_path / "c").read_text() + (tmp_path / "k").read_text())
    clients = parse_client_keys(f"alice {ALICE}\ncarol {CAROL}")
    (tmp_path / "client-keys.map").write_text(client_map(clients).reveal())
    (tmp_path / "backend-keys.map").write_text(f"a {backend_key}\n")
    (tmp_path / "haproxy.cfg").write_text(cfg + "\n")
    return tmp_path / "haproxy.cfg"


@HAPROXY
def test_haproxy_accepts_the_rendered_configuration(keys_file: Path, tmp_path: Path) -> None:
    path = local_config(render(keys_file, llama_gateway_affinity_header="X-Session-Id"), tmp_path)
    r = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # And it notices a broken one: the check is worth running before a reload.
    path.write_text(path.read_text().replace("balance hdr", "balance hdrx"))
    broken = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True)
    assert broken.returncode != 0


class PacedSSE(sse_backend.Handler):
    """A llama-server stand-in: answers every request with 40 events 25 ms apart, each
    echoing the Authorization header it got."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        auth = self.headers.get("Authorization", "")
        events = [f"data: {json.dumps({'i': i, 'auth': auth})}\n\n".encode() for i in range(40)]
        if self.server.burst:  # type: ignore[attr-defined]  # as a buffering hop would
            time.sleep(1)
            self.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
        for data in [] if self.server.burst else events:  # type: ignore[attr-defined]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.025)
        self.wfile.write(b"0\r\n\r\n")


def sse_server(burst: bool = False) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PacedSSE)
    server.burst = burst  # type: ignore[attr-defined]
    return server


def events(url: str, cafile: str | bool) -> tuple[list[float], set[str]]:
    """Arrival times of a streamed answer's events (from the request), and the
    Authorization headers the server saw."""
    t0 = time.monotonic()
    r = requests.post(url + "/v1/chat/completions", json={"stream": True},
                      headers={"Authorization": f"Bearer {ALICE}"},
                      verify=cafile, stream=True, timeout=30)  # fmt: skip
    arrivals, auth = [], set()
    for line in r.iter_lines(chunk_size=1):
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic() - t0)
            auth.add(json.loads(line[6:])["auth"])
    return arrivals, auth


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_gateway(keys_file: Path, tmp_path: Path) -> Iterator[str]:
    """The rendered configuration run by a real HAProxy in front of a paced SSE server."""
    backend = sse_server()
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = _free_port()
    served = spec("a", {"ssh_hostname": "127.0.0.1", "llama_profile": "cpu-demo",
                        "llama_host": "127.0.0.1", "llama_port": backend.server_port})  # fmt: skip
    gw = spec("gw", gateway_data(keys_file, llama_gateway_listen="127.0.0.1",
                                 llama_gateway_port=port, llama_gateway_rate_limit=3),
              gateway=True)  # fmt: skip
    path = local_config(hx.haproxy_cfg("a", gw.gateway, hx.servers("a", [served])), tmp_path)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    try:
        for _ in range(100):  # listening, and the server's first health check passed
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", verify=str(tmp_path / "c"), timeout=2).ok:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.shutdown()


@HAPROXY
def test_events_pass_as_the_server_sends_them(live_gateway: str, tmp_path: Path) -> None:
    arrivals, auth = events(live_gateway, str(tmp_path / "c"))
    assert len(arrivals) == 40
    # Sent over 39 x 25 ms: a hop that held them back would deliver them together.
    assert arrivals[-1] - arrivals[0] > 0.6, arrivals
    assert arrivals[0] < 0.5, arrivals
    # The server got its own key from the map, never the client's.
    assert auth == {f"Bearer {BOB}"}


def test_the_measure_sees_a_buffering_hop() -> None:
    """The assertion above fails on a stream delivered in one burst."""
    server = sse_server(burst=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        arrivals, _ = events(f"http://127.0.0.1:{server.server_port}", True)
    finally:
        server.shutdown()
    assert len(arrivals) == 40 and arrivals[-1] - arrivals[0] < 0.1, arrivals


def raw_post(url: str, cafile: str, headers: dict[str, str]) -> int:
    """The status of a POST whose headers alone are sent (as alice)."""
    host, port = url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=cafile), timeout=30
    )
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Authorization", f"Bearer {ALICE}")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@HAPROXY
def test_keys_limits_and_bodies_answered_by_the_gateway(live_gateway: str, tmp_path: Path) -> None:
    ca = str(tmp_path / "c")

    def post(key: str | None, body: bytes = b"{}") -> requests.Response:
        h = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(
            live_gateway + "/v1/chat/completions", data=body, headers=h, verify=ca, timeout=30
        )

    assert post(None).status_code == 401
    assert post("not-a-client-key-0123").status_code == 401
    assert post(BOB).status_code == 401  # the host's key is no client key
    # A body announced above the limit, or not announced at all, is refused before it is
    # read (the client may still be sending it).
    assert raw_post(live_gateway, ca, {"Content-Length": str(8 * 1024 * 1024 + 1)}) == 413
    assert raw_post(live_gateway, ca, {"Transfer-Encoding": "chunked"}) == 411
    # 3 per minute (requests refused before the key is checked do not count).
    codes = [post(ALICE).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429], codes
    assert post(ALICE).headers.get("Retry-After") == "60"


@HAPROXY
def test_the_deploy_can_tell_what_haproxy_runs(live_gateway: str, tmp_path: Path) -> None:
    """The check after a reload: passes when the running HAProxy has exactly the rendered
    servers, fails (saying so) when it does not, as after a reload that could not start."""
    sock = str(tmp_path / "admin.sock")
    ok = hx.serves_config_check([hx.Server("a", "a", "127.0.0.1:1", 2)], sock, wait_s=2)
    assert subprocess.run(["bash", "-c", ok], capture_output=True).returncode == 0
    other = [hx.Server(n, n, "127.0.0.1:1", 2) for n in ("a", "b")]
    p = subprocess.run(["bash", "-c", hx.serves_config_check(other, sock, wait_s=1)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 1 and "servers: a; expected: a b" in p.stderr, p.stderr


def _backend(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.support.sse_backend", str(port)],
                            cwd=ROOT, stderr=subprocess.DEVNULL)  # fmt: skip


@HAPROXY
def test_a_killed_backend_costs_only_its_requests_in_flight(
    keys_file: Path, tmp_path: Path
) -> None:
    """3 hosts of 2 slots under 6 streaming clients; one host's server is killed -9 and comes
    back 8 s later. Only the requests it was answering fail: none arriving in the moments
    before the gateway notices is answered 503, though every other slot is busy."""
    ports = [_free_port() for _ in range(3)]
    backends = [_backend(p) for p in ports]
    gport = _free_port()
    # One client fills every slot here: no per-key share (the fairness test has that).
    gw = spec("gw", gateway_data(keys_file, llama_gateway_listen="127.0.0.1",
                                 llama_gateway_port=gport, llama_gateway_max_in_flight=0),
              gateway=True)  # fmt: skip
    servers = [hx.Server(host=f"h{i}", name=f"h{i}", address=f"127.0.0.1:{p}", maxconn=2)
               for i, p in enumerate(ports)]  # fmt: skip
    path = local_config(hx.haproxy_cfg("gw", gw.gateway, servers), tmp_path)
    (tmp_path / "backend-keys.map").write_text("".join(f"h{i} k\n" for i in range(3)))
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    url, ca = f"https://127.0.0.1:{gport}/v1/chat/completions", str(tmp_path / "c")
    ok, cut, refused = [0], list[object](), list[int]()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                r = requests.post(url, json={"stream": True}, verify=ca, stream=True, timeout=30,
                                  headers={"Authorization": f"Bearer {ALICE}"})  # fmt: skip
                if r.status_code != 200:
                    refused.append(r.status_code)
                    continue
                n = sum(1 for line in r.iter_lines() if line.startswith(b"data: "))
                ok[0] += n == 40
                if n != 40:
                    cut.append(n)
            except requests.RequestException as e:
                cut.append(type(e).__name__)
            if cut or refused:
                time.sleep(0.5)

    try:
        for _ in range(100):
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url.replace("/v1/chat/completions", "/health"), verify=ca,
                                timeout=2).ok:  # fmt: skip
                    break
            time.sleep(0.1)
        time.sleep(2)  # every server's first check passed
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(3)
        backends[1].kill()
        time.sleep(8)
        backends[1] = _backend(ports[1])
        time.sleep(5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
        proxy.terminate()
        for b in backends:
            b.kill()
    assert refused == [], refused
    assert 1 <= len(cut) <= 2, cut  # the killed server's 2 slots
    assert ok[0] > 20


def test_every_host_server_resolves_names_and_may_start_unresolved(keys_file: Path) -> None:
    cfg = render(keys_file)
    assert "resolvers llamahost\n    parse-resolv-conf\n" in cfg
    assert cfg.count("resolvers llamahost resolve-prefer ipv4 init-addr last,libc,none") == 2
    # The servers of the balanced backend are the per-host proxies: nothing to resolve.
    assert "maxconn 2 track llamahost-a/a\n" in cfg


def _show_stat(sock: Path) -> str:
    """``show stat`` over the admin socket."""
    return _admin(sock, "show stat")


def _admin(sock: Path, command: str) -> str:
    """One command over HAProxy's admin socket, and its whole answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer.decode()


def without_peers(cfg: str) -> str:
    """The same configuration without its local peer: every process its own tables."""
    cfg = cfg.replace(" peers llamahost\n", "\n").replace("    localpeer local\n", "")
    start = cfg.index("peers llamahost\n")
    return cfg[:start] + cfg[cfg.index("defaults\n", start) :]


@HAPROXY
def test_the_limits_are_kept_across_a_reload(keys_file: Path, tmp_path: Path) -> None:
    """A reload starts a new process; the old one hands it the stick tables through the
    local peer, so a key over its rate limit is still over it after a reload, as is an
    address over its failed authentications. Control: the same configuration without the
    peers section forgets both at the reload."""
    backend = sse_server()
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    served = spec("a", {"ssh_hostname": "127.0.0.1", "llama_profile": "cpu-demo",
                        "llama_host": "127.0.0.1", "llama_port": backend.server_port})  # fmt: skip
    runs: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for name in ("peers", "control"):
            port = _free_port()
            gw = spec("gw", gateway_data(keys_file, llama_gateway_listen="127.0.0.1",
                                         llama_gateway_port=port, llama_gateway_rate_limit=3,
                                         llama_gateway_auth_failure_limit=2),
                      gateway=True)  # fmt: skip
            cfg = hx.haproxy_cfg("a", gw.gateway, hx.servers("a", [served]))
            assert "peers llamahost" in cfg
            (tmp_path / name).mkdir()
            path = local_config(cfg if name == "peers" else without_peers(cfg), tmp_path / name)
            assert ("peers llamahost" in path.read_text()) == (name == "peers")
            cmd = ["haproxy", "-W", "-db", "-f", str(path)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[name] = (proc, f"https://127.0.0.1:{port}", tmp_path / name)
        started = time.monotonic()
        for _, url, d in runs.values():
            for _ in range(100):
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(url + "/health", verify=str(d / "c"), timeout=2).ok:
                        break
                time.sleep(0.1)

        def get(url: str, d: Path, key: str) -> int:
            h = {"Authorization": f"Bearer {key}"}
            r = requests.get(url + "/v1/models", headers=h, verify=str(d / "c"), timeout=5)
            return r.status_code

        for _, url, d in runs.values():
            assert [get(url, d, ALICE) for _ in range(4)] == [200, 200, 200, 429]
            assert [get(url, d, "wrong-" + ALICE) for _ in range(3)] == [401, 401, 401]
            assert get(url, d, CAROL) == 429  # this address: more than 2 failures a minute
        # A process started without an old one waits up to 5 s for one to teach it, and only
        # a process past that wait teaches the next (HAProxy's resync timeout).
        time.sleep(max(0.0, 6 - (time.monotonic() - started)))
        pids = {n: _admin(d / "admin.sock", "show info") for n, (_, _, d) in runs.items()}
        for proc, _, _ in runs.values():
            proc.send_signal(signal.SIGUSR2)  # the master starts a new worker: a reload
        for n, (_, _, d) in runs.items():
            for _ in range(100):  # the admin socket answers from the new worker
                with contextlib.suppress(OSError):
                    if _admin(d / "admin.sock", "show info") != pids[n]:
                        break
                time.sleep(0.1)
            else:
                raise AssertionError(f"{n}: no new worker")
        time.sleep(0.5)  # the old worker's lesson
        _, url, d = runs["peers"]
        table = _admin(d / "admin.sock", "show table llama-clients")
        assert "key=alice" in table and "http_req_rate(60000)=4" in table, table
        assert get(url, d, ALICE) == 429
        assert get(url, d, CAROL) == 429
        _, url, d = runs["control"]
        assert get(url, d, CAROL) == 200 and get(url, d, ALICE) == 200  # both forgotten
    finally:
        for proc, _, _ in runs.values():
            proc.terminate()
            proc.wait(timeout=10)
        backend.shutdown()


@HAPROXY
def test_a_host_whose_name_does_not_resolve_is_left_out(keys_file: Path, tmp_path: Path) -> None:
    """A served host known by a name that does not resolve: HAProxy accepts the
    configuration, starts, keeps that host out of rotation and serves with the other."""
    backend = sse_server()
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = _free_port()
    good = spec("a", {"ssh_hostname": "127.0.0.1", "llama_profile": "cpu-demo",
                      "llama_host": "127.0.0.1", "llama_port": backend.server_port})  # fmt: skip
    named = spec("b", {"ssh_hostname": "does-not-resolve.invalid", "llama_profile": "cpu-demo"})
    gw = spec("gw", gateway_data(keys_file, llama_gateway_listen="127.0.0.1",
                                 llama_gateway_port=port), gateway=True)  # fmt: skip
    servers = hx.servers("gw", [good, named])
    assert servers[1].address == "does-not-resolve.invalid:8080"
    path = local_config(hx.haproxy_cfg("gw", gw.gateway, servers), tmp_path)
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url, ca = f"https://127.0.0.1:{port}", str(tmp_path / "c")
    try:
        for _ in range(100):  # listening, and a's first health check passed
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", verify=ca, timeout=2).ok:
                    break
            assert proc.poll() is None, "HAProxy did not start"
            time.sleep(0.1)
        raw = _show_stat(tmp_path / "admin.sock")
        (row,) = [r for r in raw.splitlines() if r.startswith("llamahost-b,b,")]
        assert ",MAINT (resolution)," in row, raw  # b's own proxy: its name did not resolve
        stats = hx.server_stats(raw)  # the balanced backend, as the deploy reads it
        assert stats["a"].status == "UP" and stats["b"].status.startswith("MAINT"), stats
        assert hx.out_of_rotation(stats) == ["b"]
        for _ in range(3):  # every request is answered, by a
            arrivals, auth = events(url, ca)
            assert len(arrivals) == 40 and auth == {f"Bearer {BOB}"}
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.shutdown()


# ---------------------------------------------------------------- runtime API
def test_show_stat_recorded_from_haproxy() -> None:
    stats = hx.server_stats((FIXTURES / "haproxy-show-stat.csv").read_text())
    assert set(stats) == {"a", "b"}  # only backend llama's servers
    assert stats["a"].status == "UP" and stats["b"].status == "DRAIN"
    assert stats["a"].in_flight == 0 and stats["b"].queued == 0
    assert hx.out_of_rotation(stats) == ["b"]
    with pytest.raises(ValueError):
        hx.server_stats("No such server.\n")


# HAProxy 2.6.12's own lines (Debian 12), recorded while a server was drained, stopped,
# set ready and started again; the e2e rolling test reads the gateway's log with this.
_DRAIN_CYCLE = """\
Server llama/b enters drain state. 1 active and 0 backup servers online. 0 sessions requeued, 0 total in queue.
Server llama/b is DOWN, reason: Layer4 connection problem, info: "Connection refused", check duration: 0ms. 1 active and 0 backup servers left. 0 sessions active, 0 requeued, 0 remaining in queue.
Server llama/b remains in forced drain mode.
Server llama/b is DOWN (leaving forced drain).
Server llama/b is UP, reason: Layer4 check passed, check duration: 0ms. 2 active and 0 backup servers online. 0 sessions requeued, 0 total in queue.
"""  # noqa: E501


def test_rotation_replays_a_drain_cycle_from_haproxys_log() -> None:
    rot = rotation.replay(_DRAIN_CYCLE, "llama")
    assert rot.events["b"][0] == "enters drain state"
    assert rot.most_out == 1 and rot.out_at_end == []
    # Still down after leaving drain: out until it is UP.
    rot = rotation.replay("\n".join(_DRAIN_CYCLE.splitlines()[:4]), "llama")
    assert rot.out_at_end == ["b"]
    # Another backend's lines are not this one's.
    assert rotation.replay(_DRAIN_CYCLE, "other").events == {}


def test_rotation_counts_servers_out_at_the_same_time() -> None:
    log = (
        "Server llama/a enters drain state.\n"
        "Server llama/b is DOWN, reason: Layer7 timeout\n"
        "Server llama/a is UP (leaving forced drain).\n"
        "Server llama/b is UP, reason: Layer7 check passed\n"
    )
    rot = rotation.replay(log, "llama")
    assert rot.most_out == 2 and rot.out_at_end == []
    assert rot.events["a"] == ["enters drain state", "is UP (leaving forced drain)"]
