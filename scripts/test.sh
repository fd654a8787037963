#!/usr/bin/env bash
# The tests on a fresh machine: set up (scripts/env.sh), then the README's test command (extra pytest arguments pass on).
EXTRAS="test" . "$(dirname "$0")/env.sh"
export HF_HUB_OFFLINE=1
exec python -m pytest -q -m "not slow" "$@"
