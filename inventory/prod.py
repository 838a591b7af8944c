"""Production inventory: edit the hosts, then `pyinfra inventory/prod.py deploy.py`.

Each host is (address, data). Data keys are the `llama_*` variables of README.md; anything
left out takes its default (profile `balanced`, the pinned llama.cpp commit, the unsloth
Seed-OSS-36B-Instruct UD-Q5_K_XL file). Keep secrets out of this file: read them from
the environment, as the API key below.
"""

import os

_common = {
    "ssh_user": "ubuntu",
    "_sudo": True,
    # Set LLAMA_API_KEY in the controller's environment to choose the key; otherwise each
    # host generates its own in /etc/llama-server/api-key.
    "llama_api_key": os.environ.get("LLAMA_API_KEY") or None,
}

hosts = [
    ("a100-01.example.internal", {**_common, "llama_profile": "balanced"}),
    # ("a100-02.example.internal", {**_common, "llama_profile": "low-latency"}),
]
