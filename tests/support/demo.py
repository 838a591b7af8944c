"""`make demo`: the local Debian 12 host, brought up by the real deploy, left running.

up:   create the host (if not running), serve the tiny model from a local Hub endpoint for
      the download, run `pyinfra -y inventory/local.py deploy.py`, print how to call it.
down: power the host off and remove it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import testhost
from tests.support.hubserver import HubServer
from tests.support.llama_src import archive
from tests.support.tinygguf import write as write_tiny

NAME = "demo"
SSH_PORT = 2222
PORT = 8080
REPO_DIR = testhost.CACHE / "hub" / "llamahost" / "tiny-seed-oss-GGUF"


def hub_root() -> str:
    model = REPO_DIR / "tiny-seed-oss.gguf"
    if not model.exists():
        REPO_DIR.mkdir(parents=True, exist_ok=True)
        write_tiny(str(model))
    return str(REPO_DIR.parent.parent)


def up() -> int:
    th = testhost.load(NAME)
    if th is None or not th.alive():
        th = testhost.create(NAME, SSH_PORT)
    archive()
    # The Hub endpoint is needed only while the model downloads: any free port will do.
    with HubServer(Path(hub_root())) as hub:
        env = {
            **os.environ,
            "LLAMAHOST_LOCAL_HOST": NAME,
            "LLAMAHOST_LOCAL_SSH_PORT": str(SSH_PORT),
            "LLAMAHOST_LOCAL_PORT": str(PORT),
            "LLAMAHOST_LOCAL_HUB": hub.url,
        }
        rc = subprocess.call(
            [sys.executable, "-m", "pyinfra", "-y", "inventory/local.py", "deploy.py"], env=env
        )
    if rc != 0:
        return rc
    print(
        f"""
llama-server is up on the local host '{NAME}' (Debian 12, systemd), profile cpu-demo.

  URL:      http://127.0.0.1:{PORT}   (/health needs no key)
  API key:  on the host, /etc/llama-server/api-key (root and group llama only)
  shell:    ssh -p {SSH_PORT} -i {th.key} -o UserKnownHostsFile={th.known_hosts} root@127.0.0.1

  KEY=$(ssh -p {SSH_PORT} -i {th.key} -o UserKnownHostsFile={th.known_hosts} root@127.0.0.1 \\
        cat /etc/llama-server/api-key)
  curl -H "Authorization: Bearer $KEY" http://127.0.0.1:{PORT}/v1/chat/completions \\
       -d '{{"messages":[{{"role":"user","content":"hi"}}],"max_tokens":8}}'

The model is a tiny random-weight Seed-OSS GGUF: it answers noise.
`make demo-destroy` removes the host.
"""
    )
    return 0


def down() -> int:
    testhost.destroy(NAME)
    print(f"host '{NAME}' removed")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "up"
    sys.exit({"up": up, "down": down}[cmd]())
