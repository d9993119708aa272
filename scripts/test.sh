#!/usr/bin/env bash
# The test command: installs what the tests need into .venv (made if missing), then runs pytest.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k mllp -x
# PostgreSQL tests run too when HMS_ACH_TEST_POSTGRES_URL is set (.ci/run sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
