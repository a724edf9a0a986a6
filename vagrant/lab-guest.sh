#!/usr/bin/env bash
# Runs inside the lab guest (snapmgr-lab.service): runs the command the qemu runner left in
# the results share on the project tree it shares over 9p, and leaves the command's output
# and exit status beside it. A test that needs a reboot leaves the command for after it in
# "after-reboot": the status waits, the runner boots the guest again on the same disks, and
# this second boot runs that command; the status is then the first failure of the two.
#   usage: lab-guest.sh PROJECT_SHARE RESULTS_SHARE
set -uo pipefail
project=$1
results=$2
export SNAPMGR_LAB_RESULTS=$results

echo "lab: guest up after $(cut -d' ' -f1 /proc/uptime)s"
# The share is read-only and slow to import from; tests write beside the code (caches).
rsync -a --exclude=.git --exclude=.venv --exclude=build "$project/" /root/snapmgr/
cd /root/snapmgr
if [ -e "$results/status-before-reboot" ]; then
    mapfile -t command <"$results/after-reboot"
    echo "lab: rebooted as a test asked: ${command[*]}"
    "${command[@]}" 2>&1 | tee "$results/output-after-reboot.log"
    after=${PIPESTATUS[0]}
    before=$(cat "$results/status-before-reboot")
    if [ "$before" = 0 ]; then echo "$after"; else echo "${before:-1}"; fi >"$results/status"
    sync
    exit 0
fi
mapfile -t command <"$results/command"
echo "lab: ${command[*]}"
"${command[@]}" 2>&1 | tee "$results/output.log"
code=${PIPESTATUS[0]}
if [ -e "$results/after-reboot" ]; then
    echo "lab: a test asked for a reboot; powering off for the runner to boot again"
    echo "$code" >"$results/status-before-reboot"
else
    echo "$code" >"$results/status"
fi
sync
