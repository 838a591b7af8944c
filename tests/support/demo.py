"""`make demo`: the whole stack on one local Debian 12 host, brought up by the real deploy
and left running: llama-server, the TLS gateway (HAProxy) in front of it with a client key
of the demo's, and Prometheus scraping the server and the gateway with the alert rules.

up:   create the host (if not running), write the client key (0600, .cache/demo/clients)
      once, serve the tiny model from a local Hub endpoint for the download, run
      `pyinfra -y inventory/local.py deploy.py` with the host in groups `gateway` and
      `monitoring`, copy the gateway's self-signed certificate (not its key) to
      .cache/demo/gateway-ca.pem, write the tiny model's tokenizer for `make demo-bench`
      (.cache/demo/tokenizer), and print how to call it.
roll: with TEMP set, the bundled streaming client (python -m llamahost watch) against the
      gateway while the deploy changes the sampling temperature (both llama-servers restart
      one after the other, drained): requests ok / failed every second.
down: power the host off and remove it, with .cache/demo.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from llamahost import layout
from tests.bench import tiny_tokenizer
from tests.support import testhost
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny

NAME = "demo"
SSH_PORT = 2222
PORT = 8080  # llama-server@0, direct (debugging only); @1 on 8081
INSTANCES = 2  # two llama-servers behind the gateway: a rolling change fails no request
GATEWAY_PORT = 8443
PROMETHEUS_PORT = 9090
REPO_DIR = testhost.CACHE / "hub" / "llamahost" / "tiny-seed-oss-GGUF"
DEMO_DIR = testhost.CACHE / "demo"
CLIENTS = DEMO_DIR / "clients"  # "demo <key>": the gateway's client keys file
CA = DEMO_DIR / "gateway-ca.pem"  # the gateway's self-signed certificate, for --cacert
TOKENIZER = DEMO_DIR / "tokenizer"  # the tiny model's, for `make demo-bench`
TEMP = DEMO_DIR / "temp"  # the sampling temperature `make demo-roll` last set


def hub_root() -> str:
    model = REPO_DIR / "tiny-seed-oss.gguf"
    if not model.exists():
        REPO_DIR.mkdir(parents=True, exist_ok=True)
        write_tiny(str(model))
    return str(REPO_DIR.parent.parent)


def client_key() -> None:
    """The demo's client key, made once: 0600 from the start (written through a file
    descriptor opened with that mode), in a 0700 directory."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    DEMO_DIR.chmod(0o700)
    if CLIENTS.exists():
        return
    fd = os.open(CLIENTS, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"demo {secrets.token_urlsafe(32)}\n")


def env(hub_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "LLAMAHOST_LOCAL_HOST": NAME,
        "LLAMAHOST_LOCAL_SSH_PORT": str(SSH_PORT),
        "LLAMAHOST_LOCAL_PORT": str(PORT),
        "LLAMAHOST_LOCAL_HUB": hub_url,
        "LLAMAHOST_LOCAL_GATEWAY": "1",
        "LLAMAHOST_LOCAL_GATEWAY_PORT": str(GATEWAY_PORT),
        "LLAMAHOST_LOCAL_CLIENT_KEYS": str(CLIENTS),
        "LLAMAHOST_LOCAL_MONITORING": "1",
        "LLAMAHOST_LOCAL_PROMETHEUS_PORT": str(PROMETHEUS_PORT),
        "LLAMAHOST_LOCAL_INSTANCES": str(INSTANCES),
        # The temperature of the last `make demo-roll`, so that `make demo` keeps it.
        **({"LLAMAHOST_LOCAL_TEMP": TEMP.read_text().strip()} if TEMP.exists() else {}),
    }


def rel(p: Path) -> str:
    return os.path.relpath(p, testhost.REPO)


def snippet(url: str) -> str:
    """Five lines of the openai SDK against the gateway, run from the repository."""
    return "\n".join(
        [
            "import openai, ssl",
            f'ca = ssl.create_default_context(cafile="{rel(CA)}")',
            f'key = open("{rel(CLIENTS)}").read().split()[1]',
            f'client = openai.OpenAI(base_url="{url}/v1", api_key=key, '
            "http_client=openai.DefaultHttpxClient(verify=ca))",
            'print(client.chat.completions.create(model="tiny", max_tokens=8, messages=[{"role": '
            '"user", "content": "hi"}]).choices[0].message.content)',
        ]
    )


def deploy() -> int:
    """The real deploy of inventory/local.py with the demo's settings (the Hub endpoint
    lives only while it runs: it is needed only while the model downloads)."""
    with HubServer(Path(hub_root())) as hub:
        argv = [sys.executable, "-m", "pyinfra", "-y", "inventory/local.py", "deploy.py"]
        return subprocess.call(argv, env=env(hub.url), cwd=testhost.REPO)


def watch_argv(seconds: float = 0) -> list[str]:
    """The bundled streaming client against the demo's gateway."""
    return [sys.executable, "-m", "llamahost", "watch", f"https://127.0.0.1:{GATEWAY_PORT}",
            "--key-file", rel(CLIENTS), "--cacert", rel(CA), "--seconds", str(seconds)]  # fmt: skip


def roll() -> int:
    """`make demo-roll TEMP=...`: the streaming client prints requests ok / failed every
    second while the deploy changes the sampling temperature, which restarts both
    llama-servers one after the other, each drained on the gateway first."""
    temp = os.environ.get("LLAMAHOST_LOCAL_TEMP")
    if not temp or testhost.load(NAME) is None or not CA.exists():
        print("make demo first, then: make demo-roll TEMP=0.5 (any temperature from 0 to 5)")
        return 2
    float(temp)  # a number, or the run stops here
    TEMP.write_text(temp + "\n")
    watcher = subprocess.Popen(watch_argv(), cwd=testhost.REPO)
    try:
        time.sleep(3)
        rc = deploy()
        time.sleep(3)
    finally:
        watcher.send_signal(signal.SIGINT)
        watched = watcher.wait(timeout=120)
    return rc or watched


def up() -> int:
    th = testhost.load(NAME)
    if th is None or not th.alive():
        th = testhost.create(NAME, SSH_PORT)
    archive()
    client_key()
    rc = deploy()
    if rc != 0:
        return rc
    # The certificate only (openssl x509 drops the key that shares the file).
    cert = th.run(f"openssl x509 -in {layout.GATEWAY_PEM}").stdout
    CA.write_text(cert)
    tiny_tokenizer.write(TOKENIZER)
    url = f"https://127.0.0.1:{GATEWAY_PORT}"
    key = f"$(cut -d' ' -f2 {rel(CLIENTS)})"
    body = '{"messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
    ssh = f"ssh -p {SSH_PORT} -i {th.key} -o UserKnownHostsFile={th.known_hosts} root@127.0.0.1"
    print(
        f"""
The whole stack is up on the local host '{NAME}' (Debian 12, systemd), profile cpu-demo:
llama-server behind the TLS gateway (HAProxy), Prometheus scraping both with the alerts.

  Gateway:     {url}   (self-signed: the certificate is {rel(CA)})
  Client key:  {rel(CLIENTS)}   (0600; the gateway keeps only its sha256)
  Prometheus:  http://127.0.0.1:{PROMETHEUS_PORT}/targets   (rules: /alerts)

From this directory:

  curl --cacert {rel(CA)} -H "Authorization: Bearer {key}" \\
       -H 'Content-Type: application/json' {url}/v1/chat/completions -d '{body}'

  .venv/bin/python - <<'EOF'
{snippet(url)}
EOF

Without the key the gateway answers 401. Two llama-servers serve behind the gateway
(llama_instances 2): watch a rolling change fail no request, the client printing requests
ok / failed every second while the deploy restarts each server in turn, drained first:

  make demo-roll TEMP=0.5

For debugging only: the llama-servers themselves on http://127.0.0.1:{PORT} and :{PORT + 1}
(their key on the host, /etc/llama-server/api-key), and a shell:
  {ssh}

The model is a tiny random-weight Seed-OSS GGUF: it answers noise. `make demo-bench` sweeps
it through the gateway with aiperf (JSON, CSV, plot, summary under reports/bench/).
`make demo` again changes nothing; `make demo-destroy` removes the host and {rel(DEMO_DIR)}.
"""
    )
    return 0


def down() -> int:
    testhost.destroy(NAME)
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    print(f"host '{NAME}' and {rel(DEMO_DIR)} removed")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "up"
    sys.exit({"up": up, "down": down, "roll": roll}[cmd]())
