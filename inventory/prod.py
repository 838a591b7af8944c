"""Production inventory: edit the hosts, then `pyinfra inventory/prod.py deploy.py`.

Each host is (address, data). Data keys are the `llama_*` variables of README.md; anything
left out takes its default (the pinned llama.cpp commit, the unsloth Seed-OSS-36B-Instruct
UD-Q5_K_XL file). Before the first deploy, and whenever you move the model, run
`make lock INVENTORY=inventory/prod.py`: hosts serve exactly what `prod.lock.json` pins.
Keep secrets out of this file: read them from the environment, as the API key below.
"""

import os
from pathlib import Path

_common = {
    "ssh_user": "ubuntu",
    "_sudo": True,
    "llama_model_lock": str(Path(__file__).with_suffix(".lock.json")),
    # Set LLAMA_API_KEY in the controller's environment to choose the key; otherwise each
    # host generates its own in /etc/llama-server/api-key.
    "llama_api_key": os.environ.get("LLAMA_API_KEY") or None,
    # For gated or private repositories: HF_TOKEN in the controller's environment.
    "llama_hf_token": os.environ.get("HF_TOKEN") or None,
}

# One A100 40GB per host; one host per profile as an example fleet.
hosts = [
    ("a100-01.example.internal", {**_common, "llama_profile": "balanced"}),
    ("a100-02.example.internal", {**_common, "llama_profile": "low-latency"}),
    ("a100-03.example.internal", {**_common, "llama_profile": "long-context"}),
]
