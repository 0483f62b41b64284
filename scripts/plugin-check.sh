#!/usr/bin/env bash
# Install each first-party plugin into a fresh venv from its own folder, with the core from
# this clone, and run the plugin's own tests there (the conformance kit included).
#
#   scripts/plugin-check.sh [PLUGIN...]      default: every folder under plugins/
#
# Nothing of shadowvmm is fetched from a registry: pip gets the core and the plugin as local
# paths; only third-party dependencies (msgpack, uvloop, pyroute2, pytest...) come from the
# configured index. Extra pytest arguments: PLUGIN_PYTEST_ARGS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
cd "$root"
if [ "$#" -eq 0 ]; then set -- $(ls plugins); fi
work=$(mktemp -d /tmp/shadowvmm-plugin-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
status=0
for name in "$@"; do
  dir="$root/plugins/$name"
  venv="$work/$name"
  echo "== plugin $name: fresh venv $venv"
  "$python" -m venv "$venv"
  # A plugin whose tests drive another first-party plugin (nested's qsd tests need vhost-user)
  # names it in local-test-plugins, one folder name per line: installed from here, never fetched.
  local_deps=()
  if [ -f "$dir/local-test-plugins" ]; then
    while read -r dep; do [ -n "$dep" ] && local_deps+=("$root/plugins/$dep"); done < "$dir/local-test-plugins"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$root" "${local_deps[@]}" "$dir[test]"
  "$venv/bin/python" - "$name" <<'PY'
import sys
from importlib import metadata
dists = {d.metadata["Name"] for d in metadata.distributions()}
want = {"shadowvmm", "shadowvmm-" + sys.argv[1]}
assert want <= dists, f"missing distributions: {want - dists}"
PY
  if (cd "$dir" && "$venv/bin/python" -m pytest -q -p no:cacheprovider ${PLUGIN_PYTEST_ARGS:-}); then
    echo "== plugin $name: passed"
  else
    echo "== plugin $name: FAILED"
    status=1
  fi
done
exit $status
