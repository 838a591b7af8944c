#!/bin/sh
# Compliance checks against every host of a pyinfra inventory.
#
#   tests/compliance/run.sh INVENTORY [PYTEST_ARGS...]
#
# Prints every check per host (pytest -rA, then a summary grouped by host), writes JUnit
# XML to $COMPLIANCE_JUNIT (default reports/compliance-<inventory name>.xml) and exits
# non-zero when any check fails. Extra arguments go to pytest, e.g. -k api or -m "not gpu".
set -eu

if [ $# -lt 1 ]; then
    echo "usage: $0 INVENTORY [PYTEST_ARGS...]" >&2
    exit 2
fi
inventory=$1
shift

repo=$(cd "$(dirname "$0")/../.." && pwd)
case $inventory in
    /*) ;;
    *) inventory=$(pwd)/$inventory ;;
esac
[ -f "$inventory" ] || { echo "$0: no inventory file $inventory" >&2; exit 2; }

name=$(basename "$inventory" .py)
junit=${COMPLIANCE_JUNIT:-$repo/reports/compliance-$name.xml}
mkdir -p "$(dirname "$junit")"

python=${PYTHON:-$repo/.venv/bin/python}
cd "$repo"
# -p no:cacheprovider: a compliance run leaves nothing in the checkout.
exec "$python" -m pytest tests/compliance \
    --inventory "$inventory" \
    -rA -p no:cacheprovider \
    --junitxml "$junit" -o junit_suite_name=compliance \
    "$@"
