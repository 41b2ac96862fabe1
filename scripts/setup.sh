#!/usr/bin/env bash
# Install what modelfs needs on a fresh Debian/Ubuntu machine: apt packages (only those
# missing), a virtualenv in .venv, and modelfs itself with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# fuse3/libfuse3-dev/pkg-config/gcc: pyfuse3; attr: getfattr; rclone, s3fs: peers in the benchmark
# suite; util-linux: setpriv (the unit's restrictions in tests)
for p in fuse3 libfuse3-dev pkg-config gcc attr rclone s3fs util-linux; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# git-lfs: pointer files in the adoption tests
command -v git-lfs >/dev/null || need+=(git-lfs)
# nginx: the cache tier (`modelfs tier-config`) the fleet tests run
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
# systemd-analyze verifies the unit files in the tests (the machine need not run systemd)
command -v systemd-analyze >/dev/null || need+=(systemd)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
python3 - <<'PY' || need+=(python3-dev)
import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PY
if ((${#need[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]' 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import modelfs, pyfuse3, lmdb, trio' # fail here, loudly, if the install did not work

# dvc + dvc-s3 for the adoption tests (tests/test_adopt.py), in a virtualenv of their own:
# their aiobotocore pins a botocore that modelfs's boto3 does not take
[ -x .venv-dvc/bin/dvc ] || {
  python3 -m venv .venv-dvc
  .venv-dvc/bin/python -m pip install -q --disable-pip-version-check dvc dvc-s3 2>&1 | grep -v "^WARNING: Location" || true
}
.venv-dvc/bin/dvc --version >/dev/null

# giftless, a Git LFS server, for the batch API test; its package declares none of what it
# imports, so that is listed here (the versions it was tested with as bounds)
[ -x .venv-lfs/bin/python ] && .venv-lfs/bin/python -c 'import giftless.app' 2>/dev/null || {
  python3 -m venv .venv-lfs
  .venv-lfs/bin/python -m pip install -q --disable-pip-version-check 'giftless==0.6.2' boto3 'flask>=3,<4' \
    flask-classful flask-marshmallow 'marshmallow<5' webargs pyyaml pyjwt cachetools figcan typing-extensions \
    importlib-metadata cryptography python-dotenv python-dateutil 2>&1 | grep -v "^WARNING: Location" || true
}
.venv-lfs/bin/python -c 'import giftless.app'
