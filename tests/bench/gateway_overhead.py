"""Benchmark, not a test: where the gateway's time to first token goes.

    python -m tests.bench.gateway_overhead --server BIN [--model GGUF] [--rounds 40] [--json F]

One real llama-server (the tiny model, `tests/support/tinygguf.py`, unless --model) on
loopback, and in front of it one HAProxy per step of the gateway's design, each its own
process on its own port, built up one property at a time:

  direct       the client talks to llama-server
  http         one HAProxy hop, plain HTTP (mode http, keep-alive both sides)
  tls          the same hop behind TLS (the gateway's bind line and ciphers)
  buffer       + option http-buffer-request (the whole body read before a server is chosen)
  two-hops     + the per-host proxy on a unix socket (where the host's key is set)
  gateway      the rendered production configuration (llamahost.gateway.haproxy), with its
               allowlist, client-key map, stick tables, limits and health checks, run as
               tests/unit/test_gateway.py runs it (paths under a temporary folder)

Every client keeps its connection alive (one connection per step, opened and warmed before
the first timed request), as an SDK client does. Each round sends one streamed chat
completion through every step in turn, in a rotated order; the time to first token is the
time from the request's first byte to the first `data:` event. Prints the median and p90
per step, each step's increment over the one before, and the gateway's ratio and added
milliseconds against direct, all measured in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llamahost.gateway import haproxy as hx
from llamahost.gateway.tls import SELF_SIGNED_KEY_ARGS
from tests.support import tinygguf
from tests.unit.test_gateway import ALICE, BOB, fleet, local_config

STEPS = ("direct", "http", "tls", "buffer", "two-hops", "gateway")
BODY = json.dumps(
    {
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "stream": True,
    }
).encode()
GLOBAL = """global
    log stderr local0 warning
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
defaults
    mode http
    option http-no-delay
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def make_cert(folder: Path, key: str) -> None:
    """folder/tls.pem (certificate and key, for HAProxy) and folder/c (the certificate, for
    the client), CN and SAN 127.0.0.1; key "deploy" is the deploy's self-signed key."""
    args = list(SELF_SIGNED_KEY_ARGS) if key == "deploy" else ["-newkey", key]
    subprocess.run(
        ["openssl", "req", "-x509", *args, "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(folder / "k"),
         "-out", str(folder / "c")],
        check=True, capture_output=True,
    )  # fmt: skip
    (folder / "tls.pem").write_text((folder / "c").read_text() + (folder / "k").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step_config(step: str, port: int, upstream: int, pem: Path, sockets: Path) -> str:
    """A minimal HAProxy for one step: what the step adds, nothing else."""
    tls = f" ssl crt {pem} alpn http/1.1" if step != "http" else ""
    buffer = "    option http-buffer-request\n" if step in ("buffer", "two-hops") else ""
    key = f'    http-request set-header Authorization "Bearer {BOB}"\n'
    if step != "two-hops":
        return (
            f"{GLOBAL}frontend f\n    bind 127.0.0.1:{port}{tls}\n    default_backend b\n"
            f"backend b\n{buffer}{key}    server s 127.0.0.1:{upstream}\n"
        )
    sock = sockets / "s.sock"
    return (
        f"{GLOBAL}frontend f\n    bind 127.0.0.1:{port}{tls}\n    default_backend b\n"
        f"backend b\n{buffer}    server s unix@{sock}\n"
        f"listen inner\n    bind unix@{sock} mode 600\n{key}"
        f"    server s 127.0.0.1:{upstream}\n"
    )


def gateway_config(tmp: Path, port: int, upstream: int) -> Path:
    """The production configuration, rendered for one served host at 127.0.0.1:upstream."""
    keys = tmp / "clients"
    keys.write_text(f"alice {ALICE}\n")
    keys.chmod(0o600)
    g, served = fleet(
        keys,
        llama_gateway_port=port,
        llama_gateway_listen="127.0.0.1",
        llama_gateway_max_in_flight=0,
        llama_gateway_rate_limit=0,
    )
    served = [s for s in served if s.name == "a"]
    cfg = hx.haproxy_cfg("gw", g.gateway, hx.servers("gw", served))
    cfg = cfg.replace("server a 10.0.0.1:8080 ", f"server a 127.0.0.1:{upstream} ")
    if f"127.0.0.1:{upstream}" not in cfg:
        raise SystemExit("the rendered configuration changed shape: fix gateway_config")
    return local_config(cfg, tmp)


class Client:
    """One kept-alive connection; ttft() streams one chat completion to its end."""

    def __init__(self, port: int, tls: bool, key: str | None):
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", port, context=ctx, timeout=60
            )
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.reconnects = 0
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def _drop_if_closed(self) -> None:
        """As an SDK's pool does before reusing a connection: one the server closed is
        replaced (llama-server closes its connection after every streamed answer, whatever
        its Keep-Alive header says; HAProxy keeps the client's)."""
        sock = self.conn.sock
        if sock is None:
            return
        if select.select([sock], [], [], 0)[0]:
            try:
                closed = sock.recv(1, socket.MSG_PEEK) == b""
            except ssl.SSLWantReadError:
                closed = False
            except OSError:
                closed = True
            if closed:
                self.conn.close()
                self.reconnects += 1

    def ttft(self) -> float:
        t0 = time.perf_counter()
        self._drop_if_closed()
        self.conn.request("POST", "/v1/chat/completions", BODY, self.headers)
        r = self.conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
        first = None
        while line := r.readline():
            if first is None and line.startswith(b"data:"):
                first = time.perf_counter() - t0
        if first is None:
            raise SystemExit("no event in the answer")
        return first


class SdkClient:
    """The openai SDK's client (httpx, its connection pool), as applications use it."""

    def __init__(self, port: int, tls: bool, key: str | None, ca: Path):
        import openai

        scheme = "https" if tls else "http"
        self.reconnects = 0
        self.client = openai.OpenAI(
            base_url=f"{scheme}://127.0.0.1:{port}/v1",
            api_key=key or "unused",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=str(ca)) if tls else None,
        )

    def ttft(self) -> float:
        t0 = time.perf_counter()
        stream = self.client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=4,
            stream=True,
        )
        first = None
        for _ in stream:
            if first is None:
                first = time.perf_counter() - t0
        if first is None:
            raise SystemExit("no event in the answer")
        return first


def wait_port(port: int, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def wait_health(port: int, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise SystemExit(f"llama-server on {port} never became healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--server", required=True, help="a llama-server binary")
    ap.add_argument("--model", help="a GGUF (default: the tiny test model)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--client", choices=("raw", "sdk"), default="raw",
                    help="raw: http.client, kept alive; sdk: the openai SDK")  # fmt: skip
    ap.add_argument("--cert", default="deploy",
                    help="the TLS key: deploy (the self-signed key the deploy makes, ECDSA "
                         "P-256), or an openssl -newkey value such as rsa:3072")  # fmt: skip
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not shutil.which("haproxy"):
        raise SystemExit("haproxy is not installed (make sysdeps)")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = a.model or str(tmp / "tiny.gguf")
        if not a.model:
            tinygguf.write(model)
        upstream = free_port()
        try:
            procs.append(subprocess.Popen(
                [a.server, "-m", model, "--host", "127.0.0.1", "--port", str(upstream),
                 "-np", "2", "-c", "1024", "--threads", "1", "--no-webui"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            wait_port(upstream)
            wait_health(upstream)
            gw_dir = tmp / "gateway"
            gw_dir.mkdir()
            ports = {s: free_port() for s in STEPS[1:]}
            gw_cfg = gateway_config(gw_dir, ports["gateway"], upstream)
            make_cert(gw_dir, a.cert)  # every TLS step serves this one
            pem = gw_dir / "tls.pem"
            for step in STEPS[1:-1]:
                sd = tmp / step
                sd.mkdir()
                (sd / "haproxy.cfg").write_text(step_config(step, ports[step], upstream, pem, sd))
            for step in STEPS[1:]:
                cfg = gw_cfg if step == "gateway" else tmp / step / "haproxy.cfg"
                procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(cfg)]))
            for port in ports.values():
                wait_port(port)
            time.sleep(3)  # the gateway's health checks mark the host up
            ca = gw_dir / "c"  # the certificate local_config made (CN and SAN 127.0.0.1)
            clients: dict[str, Client | SdkClient] = {}
            for step in STEPS:
                key = ALICE if step == "gateway" else None
                port, tls = (upstream, False) if step == "direct" else (ports[step], step != "http")
                if a.client == "sdk":
                    clients[step] = SdkClient(port, tls, key, ca)
                else:
                    clients[step] = Client(port, tls, key)
            for name, c in clients.items():  # warm: connections, TLS, the first answer
                try:
                    for _ in range(3):
                        c.ttft()
                except (OSError, http.client.HTTPException) as e:
                    raise SystemExit(f"{name}: {type(e).__name__}: {e}") from e
            times: dict[str, list[float]] = {s: [] for s in STEPS}
            for i in range(a.rounds):
                order = STEPS[i % len(STEPS) :] + STEPS[: i % len(STEPS)]
                for s in order:
                    times[s].append(clients[s].ttft())
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    out: dict[str, Any] = {
        "rounds": a.rounds,
        "client": a.client,
        "cert": a.cert,
        "cpus": os.cpu_count(),
        "reconnects": {s: c.reconnects for s, c in clients.items()},
        "steps": {},
    }
    prev = None
    for s in STEPS:
        xs = sorted(times[s])
        med = statistics.median(xs)
        p90 = xs[int(0.9 * (len(xs) - 1))]
        row = {"median_ms": round(med * 1e3, 3), "p90_ms": round(p90 * 1e3, 3)}
        if prev is not None:
            row["added_over_previous_ms"] = round((med - prev) * 1e3, 3)
        out["steps"][s] = row
        prev = med
        print(f"{s:9s} median {row['median_ms']:7.3f} ms  p90 {row['p90_ms']:7.3f} ms"
              + (f"  +{row['added_over_previous_ms']:.3f} ms" if "added_over_previous_ms" in row
                 else ""))  # fmt: skip
    dm, gm = statistics.median(times["direct"]), statistics.median(times["gateway"])
    out["gateway_over_direct"] = round(gm / dm, 3)
    out["gateway_added_ms"] = round((gm - dm) * 1e3, 3)
    print(f"gateway / direct: {gm / dm:.2f}x, {1e3 * (gm - dm):.2f} ms added "
          "(goal: <= 1.2x or <= 1 ms)")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
