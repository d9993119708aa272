#!/usr/bin/env bash
# The test command: installs what the tests need into .venv (made if missing), then runs pytest.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k mllp -x
# PostgreSQL tests run too when HMS_ACH_TEST_POSTGRES_URL is set (.ci/run sets it).
#
# Two passes: first every test but the `serial` ones, in parallel (pytest-xdist, whole files per
# worker, HMS_ACH_TEST_WORKERS workers: by default one more than the cores, since most tests wait
# on engines and peers); then the `serial` ones alone: they assert latency bounds that a machine
# busy with other tests cannot judge. HMS_ACH_TEST_WORKERS=0 runs the first pass in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
# The browser tests drive Debian's chromium (never a downloaded browser): install it when missing and
# this shell may (root with apt-get); otherwise those tests skip and say why.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } \
    || echo "chromium could not be installed: the browser tests will skip"
fi
workers=${HMS_ACH_TEST_WORKERS:-$(($(nproc) + 1))}
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadfile)
set +e
.venv/bin/python -m pytest "${parallel[@]}" -m "not serial" "$@"
first=$?
echo "== the serial tests, alone"
.venv/bin/python -m pytest -m serial "$@"
second=$?
set -e
# pytest exits 5 when a pass selected no test: that pass is no failure unless both found none.
if [ "$first" = 5 ] && [ "$second" = 5 ]; then exit 5; fi
[ "$first" = 5 ] && first=0
[ "$second" = 5 ] && second=0
if [ "$first" != 0 ]; then exit "$first"; fi
exit "$second"
