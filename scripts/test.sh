#!/usr/bin/env bash
# The test command: installs what the tests need into .venv (made if missing), then runs pytest.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k mllp -x
# PostgreSQL tests run too when HMS_ACH_TEST_POSTGRES_URL is set (.ci/run sets it).
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
exec .venv/bin/python -m pytest "$@"
