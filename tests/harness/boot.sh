#!/usr/bin/env bash
# Command-line front end of lib.sh: boots and stops appliance containers.
#
#   boot.sh start NAME [NSPAWN_ARG...]  build the root if needed, boot, wait; prints key=value
#   boot.sh exec NAME CMD [ARG...]      run CMD inside (exit status is CMD's)
#   boot.sh shell NAME                  interactive shell inside
#   boot.sh stop NAME                   orderly poweroff (forced after APPLIANCE_STOP_TIMEOUT s)
#   boot.sh list                        running containers
#   boot.sh stop-all                    stop every container of this harness
#
# Example:
#   bash tests/harness/boot.sh start demo --bind-ro="$PWD/target/debug:/opt/agent-bin"
#   bash tests/harness/boot.sh exec demo systemctl status clamav-daemon
#   bash tests/harness/boot.sh stop demo
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 1 ] || usage
cmd=$1
shift
case $cmd in
  start)
    [ $# -ge 1 ] || usage
    [ "$(id -u)" -eq 0 ] || { echo "boot.sh: must run as root" >&2; exit 2; }
    name=$1
    shift
    root=${APPLIANCE_ROOTFS:-}
    if [ -z "$root" ]; then
      root=$(bash "$HERE/build-rootfs.sh" | tail -n 1)
    fi
    appliance_start "$name" "$root" "$@"
    ;;
  exec)
    [ $# -ge 2 ] || usage
    name=$1
    shift
    appliance_exec "$name" "$@"
    ;;
  shell)
    [ $# -eq 1 ] || usage
    appliance_exec "$1" /bin/bash -l
    ;;
  stop)
    [ $# -eq 1 ] || usage
    appliance_stop "$1"
    ;;
  list)
    appliance_list
    ;;
  stop-all)
    for n in $(appliance_list); do appliance_stop "$n" || true; done
    ;;
  watch)
    # internal: started by appliance_start when APPLIANCE_OWNER_PID is set
    appliance_watch "$1"
    ;;
  *) usage ;;
esac
