#!/usr/bin/env bash
# apt-get ARGS (as root, non-interactive), waiting up to $APT_LOCK_WAIT seconds (default 600) for another
# apt-get to let go of its locks: CI installs the tests' Debian packages beside pip while a test may install
# them too. Output on stdout; on failure on stderr, exit 1.
#
#   bash cluster/apt_get.sh update -qq && bash cluster/apt_get.sh install -y -qq PACKAGE...
set -uo pipefail
wait_seconds=${APT_LOCK_WAIT:-600}
deadline=$((SECONDS + wait_seconds))
until out=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$wait_seconds" "$@" 2>&1); do
    # `apt-get update` does not wait for its lock by itself
    [[ $out == *"Could not get lock"* ]] && ((SECONDS < deadline)) || { echo "$out" >&2; exit 1; }
    sleep 2
done
echo "$out"
