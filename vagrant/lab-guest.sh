#!/usr/bin/env bash
# Runs inside the lab guest (snapmgr-lab.service): runs the command the qemu runner left in
# the results share on the project tree it shares over 9p, and leaves the command's output
# and exit status beside it.
#   usage: lab-guest.sh PROJECT_SHARE RESULTS_SHARE
set -uo pipefail
project=$1
results=$2

echo "lab: guest up after $(cut -d' ' -f1 /proc/uptime)s"
# The share is read-only and slow to import from; tests write beside the code (caches).
rsync -a --exclude=.git --exclude=.venv --exclude=build "$project/" /root/snapmgr/
cd /root/snapmgr
mapfile -t command <"$results/command"
echo "lab: ${command[*]}"
"${command[@]}" 2>&1 | tee "$results/output.log"
echo "${PIPESTATUS[0]}" >"$results/status"
sync
