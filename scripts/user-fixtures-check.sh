#!/usr/bin/env bash
# The users' toolkit as a user gets it: a fresh venv with NON-editable installs of
# shadowvmm[pytest] and the vhost-user plugin from this clone (nothing else), then pytest on
# tests/user_examples/ copied into an empty directory outside the repository, with no
# configuration file: blk_roundtrip.py must pass (qemu-storage-daemon, and the reference
# back-end launched through vhost_user_daemon); failing.py must fail and show the vhost-user
# trace and the peer's log tail in its report.
#
#   scripts/user-fixtures-check.sh
#
# Only third-party dependencies (pytest, pytest-asyncio, msgpack, uvloop, pyroute2) come from
# the configured index. A missing qemu-storage-daemon skips the tests (fails under CI=true).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d /tmp/shadowvmm-user-fixtures.XXXXXX)
trap 'rm -rf "$work"' EXIT
venv="$work/venv"
user="$work/usertest"
echo "== user fixtures: fresh venv $venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$root[pytest]" "$root/plugins/vhost-user"
"$venv/bin/python" - <<'PY'
from importlib import metadata
dists = {d.metadata["Name"].lower(): d for d in metadata.distributions()}
mine = sorted(name for name in dists if name.startswith("shadowvmm"))
assert mine == ["shadowvmm", "shadowvmm-vhost-user"], mine
for name in mine:       # non-editable: the code lives in site-packages, not in the clone
    direct = dists[name].read_text("direct_url.json") or "{}"
    assert '"editable": true' not in direct, f"{name} is an editable install: {direct}"
assert {"pytest", "pytest-asyncio"} <= set(dists), sorted(dists)
PY
mkdir "$user"
cp "$root/tests/user_examples/blk_roundtrip.py" "$user/test_blk_roundtrip.py"
cd "$user"
unset PYTHONPATH PYTEST_ADDOPTS PYTEST_PLUGINS
"$venv/bin/python" -m pytest -q -p no:cacheprovider -rA
cp "$root/tests/user_examples/failing.py" "$user/test_failing.py"
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider test_failing.py > failing.out 2>&1 || status=$?
if [ "$status" -ne 1 ] || ! grep -q -- "- vhost-user trace (last " failing.out \
    || ! grep -q -- "- peer log: qsd-blk (running, " failing.out || ! grep -q " send SET_VRING_ENABLE " failing.out; then
  cat failing.out
  echo "== user fixtures: FAILED (the failing test's report lacks the trace or the peer log; pytest status $status)"
  exit 1
fi
echo "== user fixtures: passed"
