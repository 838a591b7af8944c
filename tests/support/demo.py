"""`make demo`: the whole stack on one local Debian 12 host, brought up by the real deploy
and left running: llama-server, the TLS gateway (HAProxy) in front of it with a client key
of the demo's, and Prometheus scraping the server and the gateway with the alert rules.

up:   create the host (if not running), write the client key (0600, .cache/demo/clients)
      once, serve the tiny model from a local Hub endpoint for the download, run
      `pyinfra -y inventory/local.py deploy.py` with the host in groups `gateway` and
      `monitoring`, copy the gateway's self-signed certificate (not its key) to
      .cache/demo/gateway-ca.pem, write the tiny model's tokenizer for `make demo-bench`
      (.cache/demo/tokenizer), and print how to call it.
down: power the host off and remove it, with .cache/demo.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from llamahost import layout
from tests.bench import tiny_tokenizer
from tests.support import testhost
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny

NAME = "demo"
SSH_PORT = 2222
PORT = 8080  # llama-server, direct (debugging only)
GATEWAY_PORT = 8443
PROMETHEUS_PORT = 9090
REPO_DIR = testhost.CACHE / "hub" / "llamahost" / "tiny-seed-oss-GGUF"
DEMO_DIR = testhost.CACHE / "demo"
CLIENTS = DEMO_DIR / "clients"  # "demo <key>": the gateway's client keys file
CA = DEMO_DIR / "gateway-ca.pem"  # the gateway's self-signed certificate, for --cacert
TOKENIZER = DEMO_DIR / "tokenizer"  # the tiny model's, for `make demo-bench`


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


def up() -> int:
    th = testhost.load(NAME)
    if th is None or not th.alive():
        th = testhost.create(NAME, SSH_PORT)
    archive()
    client_key()
    # The Hub endpoint is needed only while the model downloads: any free port will do.
    with HubServer(Path(hub_root())) as hub:
        argv = [sys.executable, "-m", "pyinfra", "-y", "inventory/local.py", "deploy.py"]
        rc = subprocess.call(argv, env=env(hub.url), cwd=testhost.REPO)
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

Without the key the gateway answers 401. For debugging only: llama-server itself on
http://127.0.0.1:{PORT} (its own key on the host, /etc/llama-server/api-key), and a shell:
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
    sys.exit({"up": up, "down": down}[cmd]())
