#!/bin/sh
# Entry script of the hms-ach image (Dockerfile), usable outside a container too:
#   HMS_ACH_HOME  the deployment folder (default: the current directory)
# On first start (no channels.yaml there) it scaffolds the folder with `hms-ach init`. Then it checks
# the configuration (`hms-ach check`: a bad config stops here with file:line:col) and runs
# `hms-ach <command>` (default `run`) in that folder, as PID 1's child replaced by exec, so that
# SIGTERM reaches the engine and drains it.
set -eu
home="${HMS_ACH_HOME:-$(pwd)}"
if [ ! -f "$home/channels.yaml" ]; then
  hms-ach init "$home"
fi
cd "$home"
if [ "$#" -eq 0 ]; then
  set -- run
fi
if [ "$1" = "run" ]; then
  hms-ach check --config channels.yaml
fi
exec hms-ach "$@"
