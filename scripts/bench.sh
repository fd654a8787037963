#!/usr/bin/env bash
# The main job on a fresh machine: set up (scripts/env.sh), then `rapiddiff bench` with any arguments given.
EXTRAS="test,bench" . "$(dirname "$0")/env.sh"
exec rapiddiff bench "$@"
