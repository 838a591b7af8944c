"""Monitoring alone, without the bring-up.

    pyinfra -y INVENTORY tests/monitoring/deploy_monitoring.py

For developing tasks/monitoring.py against a host that already serves llama-server; the
real run is deploy.py. A host whose data sets `dev_alias` is a second name for a host of
the inventory: it is scraped, nothing is installed on it.
"""

from pyinfra.context import host

from tasks import monitoring, preflight

spec = preflight.validated_spec()
if not host.data.get("dev_alias"):
    monitoring.exporters(spec)
monitoring.prometheus(spec)
