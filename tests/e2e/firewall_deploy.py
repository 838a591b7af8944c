"""deploy.py's exposure step alone (step 6: the served host's firewall), for the test host
that has a network namespace of its own and so no internet to install the rest from.
The same spec (preflight) and the same task as deploy.py."""

from tasks import firewall, preflight

spec = preflight.validated_spec()
firewall.apply(spec)
