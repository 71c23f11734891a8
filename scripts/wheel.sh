#!/usr/bin/env bash
# Builds the Python helper's wheel (clients/python) offline, with the
# flit_core that scripts/tools.sh cached, into OUT (default dist/python):
#   scripts/wheel.sh [OUT]
# prints the wheel's path. `pip install` takes the wheel with no network.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/dist/python}
cache=$("$root/scripts/tools.sh")
flit=$(grep -o '^FLIT_CORE_VERSION=[^ ]*' "$root/scripts/tools.sh" | cut -d= -f2)
python=${PYTHON:-python3}
mkdir -p "$out"
# pip runs the PEP 517 build in an isolated environment holding only the
# cached flit_core: nothing is fetched.
"$python" -m pip wheel --quiet --no-deps --no-index --find-links "$cache/flit_core-$flit" -w "$out" "$root/clients/python" >&2
ls "$out"/preemptd-*-py3-none-any.whl
