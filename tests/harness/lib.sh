# shellcheck shell=bash
# Boots, enters and stops appliance containers: systemd-nspawn --boot of the cached
# root (build-rootfs.sh) with a private network, real systemd as PID 1 and a real
# system bus. Source this file, or use boot.sh, its command-line front end.
#
#   appliance_start NAME ROOTFS [NSPAWN_ARG...]   boot, wait for running/degraded
#   appliance_exec NAME CMD [ARG...]              run a command inside (nsenter)
#   appliance_stop NAME                           clean poweroff, forced after a timeout
#   appliance_pid1 NAME                           the container's PID 1 as seen by the host
#
# No systemd-machined is involved (--register=no, --keep-unit): the host need not
# run systemd. Each container gets its own cgroup (appliance-harness/NAME), so
# several containers can run at once and a forced stop can kill whatever is left.
# State lives in $APPLIANCE_STATE_DIR/NAME (default /run/appliance-harness).
#
# The root is mounted with --volatile=overlay: the cached root is the read-only
# lower layer and every write goes to a tmpfs that disappears with the container,
# so tests never change the cache and booting costs no copy.
#
# When APPLIANCE_OWNER_PID is set at start, a watcher stops the container as soon
# as that process is gone (a test binary that crashed or was killed).

APPLIANCE_HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
APPLIANCE_STATE=${APPLIANCE_STATE_DIR:-/run/appliance-harness}
APPLIANCE_BOOT_TIMEOUT=${APPLIANCE_BOOT_TIMEOUT:-120}
APPLIANCE_STOP_TIMEOUT=${APPLIANCE_STOP_TIMEOUT:-30}
APPLIANCE_CGROUP_PARENT=appliance-harness
APPLIANCE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

appliance_log() { printf 'appliance: %s\n' "$*" >&2; }

# Start time of a process (clock ticks since boot), or nothing when it is gone.
appliance_proc_start() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # fields after "comm)": state is 1st, starttime is 20th
  # shellcheck disable=SC2086
  set -- $stat
  [ "$1" != Z ] || return 1
  printf '%s\n' "${20}"
}

# True when PID is alive and is the process that had START as its start time.
appliance_pid_alive() {
  local pid=$1 start=${2:-} now
  [ -n "$pid" ] || return 1
  now=$(appliance_proc_start "$pid") || return 1
  [ -z "$start" ] || [ "$now" = "$start" ]
}

# The cgroup directories (one per hierarchy that nspawn uses) of container NAME.
appliance_cgroup_dirs() {
  local name=$1
  if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then
    echo "/sys/fs/cgroup/$APPLIANCE_CGROUP_PARENT/$name"
    return
  fi
  if [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then
    echo "/sys/fs/cgroup/unified/$APPLIANCE_CGROUP_PARENT/$name"
  fi
  if [ -d /sys/fs/cgroup/systemd ]; then
    echo "/sys/fs/cgroup/systemd/$APPLIANCE_CGROUP_PARENT/$name"
  fi
}

# Kills every process left in the container's cgroups and removes them.
appliance_cgroup_cleanup() {
  local name=$1 cg f pid _
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local left=0
    for cg in $(appliance_cgroup_dirs "$name"); do
      [ -d "$cg" ] || continue
      while read -r f; do
        while read -r pid; do
          [ -n "$pid" ] || continue
          kill -KILL "$pid" 2>/dev/null && left=1
        done <"$f"
      done < <(find "$cg" -name cgroup.procs 2>/dev/null)
    done
    [ "$left" -eq 0 ] && break
    sleep 0.2
  done
  for cg in $(appliance_cgroup_dirs "$name"); do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  return 0
}

appliance_state_dir() { printf '%s/%s\n' "$APPLIANCE_STATE" "$1"; }

# The capability bounding set of process PID as a setpriv --bounding-set argument
# ("-all,+chown,+dac_override,..."). Commands entered with nsenter would otherwise keep
# the host's full set (CAP_SYS_TIME: `date -s` inside would set the host's clock);
# with this they get exactly what the container's own processes get.
appliance_caps() {
  local pid=$1 hex i out=-all
  local -a names=(chown dac_override dac_read_search fowner fsetid kill setgid setuid
    setpcap linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock
    ipc_owner sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot
    sys_nice sys_resource sys_time sys_tty_config mknod lease audit_write audit_control
    setfcap mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon
    bpf checkpoint_restore)
  hex=$(awk '/^CapBnd:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || return 1
  [ -n "$hex" ] || return 1
  for i in "${!names[@]}"; do
    if (((16#$hex >> i) & 1)); then out+=",+${names[$i]}"; fi
  done
  printf '%s\n' "$out"
}

appliance_pid1() {
  cat "$(appliance_state_dir "$1")/pid1" 2>/dev/null
}

# Runs CMD inside container NAME: all of PID 1's namespaces but the user namespace
# (there is none), its root and working directory, its capability bounding set and
# a clean environment. Root inside is root outside, so systemctl reaches PID 1 over
# /run/systemd/private and busctl --system reaches dbus-daemon over
# /run/dbus/system_bus_socket. (The command is not in the container's cgroup and not
# under nspawn's seccomp filter.)
appliance_exec() {
  local name=$1 pid1 caps
  shift
  pid1=$(appliance_pid1 "$name") || { appliance_log "no container $name"; return 125; }
  caps=$(cat "$(appliance_state_dir "$name")/caps" 2>/dev/null) || caps=$(appliance_caps "$pid1") \
    || { appliance_log "cannot read the capabilities of $name's PID 1"; return 125; }
  nsenter --target "$pid1" --mount --uts --ipc --net --pid --root --wd -- \
    /usr/bin/setpriv --bounding-set="$caps" -- \
    /usr/bin/env -i PATH="$APPLIANCE_PATH" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 "$@"
}

# Boots container NAME from ROOTFS and waits until systemd reports running or
# degraded. Prints key=value lines (name, pid1, nspawn_pid, state, boot_ms, ...).
appliance_start() {
  local name=$1 root=$2
  shift 2
  if ! [[ $name =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]]; then
    appliance_log "invalid container name '$name' (a-z, 0-9, '-', at most 63)"
    return 2
  fi
  [ -e "$root/.complete" ] || { appliance_log "$root is not a complete root (build-rootfs.sh)"; return 2; }
  appliance_sweep
  local dir started_ns
  dir=$(appliance_state_dir "$name")
  if [ -e "$dir" ]; then
    appliance_log "container $name exists already ($dir)"
    return 2
  fi
  mkdir -p "$dir"
  started_ns=$(date +%s%N)
  printf '%s\n' "$root" >"$dir/rootfs"
  if [ -n "${APPLIANCE_OWNER_PID:-}" ]; then
    printf '%s %s\n' "$APPLIANCE_OWNER_PID" "$(appliance_proc_start "$APPLIANCE_OWNER_PID")" >"$dir/owner"
  fi

  local cg
  for cg in $(appliance_cgroup_dirs "$name"); do
    if [ -d "$cg" ]; then
      appliance_cgroup_cleanup "$name"
      break
    fi
  done
  (
    # The container's own cgroup, so that concurrent containers do not share one.
    for cg in $(appliance_cgroup_dirs "$name"); do
      mkdir -p "$cg" && echo "$BASHPID" >"$cg/cgroup.procs"
    done
    exec systemd-nspawn --quiet --boot --private-network \
      --machine="$name" --directory="$root" --volatile=overlay \
      --register=no --keep-unit --link-journal=no --console=read-only \
      --resolv-conf=off --timezone=off "$@" \
      </dev/null >"$dir/console.log" 2>&1
  ) &
  local nspawn_pid=$!
  echo "$nspawn_pid $(appliance_proc_start "$nspawn_pid")" >"$dir/nspawn"

  local deadline=$((SECONDS + APPLIANCE_BOOT_TIMEOUT)) pid1="" c
  # PID 1 is nspawn's child whose PID in its own namespace is 1, once it has
  # executed systemd.
  while [ -z "$pid1" ]; do
    if ! appliance_pid_alive "$nspawn_pid"; then
      appliance_log "systemd-nspawn exited during boot; console:"
      tail -n 30 "$dir/console.log" >&2
      appliance_stop "$name" >/dev/null 2>&1
      return 1
    fi
    # shellcheck disable=SC2013 # the children files hold space-separated PIDs
    for c in $(cat /proc/"$nspawn_pid"/task/*/children 2>/dev/null); do
      if grep -Eq '^NSpid:[[:space:]]+[0-9]+[[:space:]]+1$' "/proc/$c/status" 2>/dev/null \
        && [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ]; then
        pid1=$c
      fi
    done
    if [ -z "$pid1" ]; then
      [ $SECONDS -lt $deadline ] || { appliance_log "no PID 1 after ${APPLIANCE_BOOT_TIMEOUT}s"; appliance_stop "$name" >/dev/null 2>&1; return 1; }
      sleep 0.05
    fi
  done
  local caps
  caps=$(appliance_caps "$pid1") || { appliance_log "cannot read the capabilities of PID 1"; appliance_stop "$name" >/dev/null 2>&1; return 1; }
  echo "$caps" >"$dir/caps"
  echo "$pid1" >"$dir/pid1"

  local state=""
  while :; do
    state=$(appliance_exec "$name" systemctl is-system-running 2>/dev/null) || true
    case $state in
      running | degraded) break ;;
      maintenance | stopping)
        appliance_log "container $name is $state; console:"
        tail -n 30 "$dir/console.log" >&2
        appliance_stop "$name" >/dev/null 2>&1
        return 1
        ;;
    esac
    if [ $SECONDS -ge $deadline ]; then
      appliance_log "container $name still '${state:-unreachable}' after ${APPLIANCE_BOOT_TIMEOUT}s; jobs:"
      appliance_exec "$name" systemctl list-jobs --no-legend >&2 || true
      tail -n 30 "$dir/console.log" >&2
      appliance_stop "$name" >/dev/null 2>&1
      return 1
    fi
    sleep 0.1
  done
  local boot_ms=$((($(date +%s%N) - started_ns) / 1000000))
  echo "$state" >"$dir/state"
  if [ "$state" = degraded ]; then
    appliance_log "container $name is degraded; failed units:"
    appliance_exec "$name" systemctl --failed --no-legend --plain >&2 || true
  fi

  if [ -f "$dir/owner" ]; then
    setsid bash "$APPLIANCE_HARNESS_DIR/boot.sh" watch "$name" </dev/null >>"$dir/watch.log" 2>&1 &
    echo "$! $(appliance_proc_start $!)" >"$dir/watcher"
  fi

  printf 'name=%s\npid1=%s\nnspawn_pid=%s\nstate=%s\nboot_ms=%s\nstate_dir=%s\nconsole_log=%s\nrootfs=%s\ncaps=%s\n' \
    "$name" "$pid1" "$nspawn_pid" "$state" "$boot_ms" "$dir" "$dir/console.log" "$root" "$caps"
}

# Stops container NAME: SIGTERM to systemd-nspawn, which asks the container's
# systemd for an orderly shutdown (SIGRTMIN+3, the default --kill-signal with
# --boot); after APPLIANCE_STOP_TIMEOUT seconds, SIGKILL to PID 1 (ends the PID
# namespace) and nspawn. Then the cgroups and state are removed. Prints stop_ms.
appliance_stop() {
  local name=$1 dir nspawn_pid nspawn_start started_ns forced=no
  dir=$(appliance_state_dir "$name")
  [ -d "$dir" ] || { appliance_log "no container $name"; return 1; }
  started_ns=$(date +%s%N)
  exec 8>"$dir/lock"
  flock 8
  if [ -f "$dir/nspawn" ]; then
    read -r nspawn_pid nspawn_start <"$dir/nspawn"
    if appliance_pid_alive "$nspawn_pid" "$nspawn_start"; then
      kill -TERM "$nspawn_pid" 2>/dev/null || true
      local deadline=$((SECONDS + APPLIANCE_STOP_TIMEOUT))
      while appliance_pid_alive "$nspawn_pid" "$nspawn_start" && [ $SECONDS -lt $deadline ]; do
        sleep 0.05
      done
      if appliance_pid_alive "$nspawn_pid" "$nspawn_start"; then
        forced=yes
        appliance_log "container $name did not power off in ${APPLIANCE_STOP_TIMEOUT}s; killing it"
        local pid1
        pid1=$(appliance_pid1 "$name")
        [ -n "$pid1" ] && kill -KILL "$pid1" 2>/dev/null
        sleep 1
        kill -KILL "$nspawn_pid" 2>/dev/null || true
      fi
      # Reaps it when it is our own child (a shell that sourced this file).
      wait "$nspawn_pid" 2>/dev/null || true
    fi
  fi
  appliance_cgroup_cleanup "$name"
  # nspawn leaves its mount propagation directory behind when /run is not a tmpfs.
  local prop=/run/systemd/nspawn/propagate/$name
  if [ -d "$prop" ] && ! mountpoint -q "$prop"; then rm -rf --one-file-system "$prop"; fi
  local watcher watcher_start
  if [ -f "$dir/watcher" ]; then
    read -r watcher watcher_start <"$dir/watcher"
    if [ "$watcher" != "$$" ] && appliance_pid_alive "$watcher" "$watcher_start"; then
      kill -TERM "$watcher" 2>/dev/null || true
    fi
  fi
  if [ -n "${APPLIANCE_KEEP_LOGS:-}" ]; then
    cp "$dir/console.log" "$APPLIANCE_STATE/$name.console.log" 2>/dev/null || true
  fi
  exec 8>&-
  rm -rf "$dir"
  printf 'stop_ms=%s\nforced=%s\n' "$((($(date +%s%N) - started_ns) / 1000000))" "$forced"
}

# Stops containers whose owner process is gone and forgets those whose nspawn died.
appliance_sweep() {
  local dir name owner owner_start nspawn_pid nspawn_start
  [ -d "$APPLIANCE_STATE" ] || return 0
  for dir in "$APPLIANCE_STATE"/*/; do
    [ -d "$dir" ] || continue
    name=$(basename "$dir")
    [ -f "$dir/nspawn" ] || continue
    read -r nspawn_pid nspawn_start <"$dir/nspawn"
    if ! appliance_pid_alive "$nspawn_pid" "$nspawn_start"; then
      appliance_log "forgetting container $name (systemd-nspawn is gone)"
      appliance_stop "$name" >/dev/null 2>&1 || true
      continue
    fi
    if [ -f "$dir/owner" ]; then
      read -r owner owner_start <"$dir/owner"
      if ! appliance_pid_alive "$owner" "$owner_start"; then
        appliance_log "stopping container $name (its owner $owner is gone)"
        appliance_stop "$name" >/dev/null 2>&1 || true
      fi
    fi
  done
}

# Runs until container NAME is gone; stops it when its owner process exits.
appliance_watch() {
  local name=$1 dir owner owner_start nspawn_pid nspawn_start
  dir=$(appliance_state_dir "$name")
  read -r owner owner_start <"$dir/owner" || return 1
  read -r nspawn_pid nspawn_start <"$dir/nspawn" || return 1
  while [ -d "$dir" ]; do
    if ! appliance_pid_alive "$nspawn_pid" "$nspawn_start"; then
      appliance_stop "$name" >/dev/null 2>&1 || true
      return 0
    fi
    if ! appliance_pid_alive "$owner" "$owner_start"; then
      appliance_log "owner $owner of $name is gone; stopping it"
      appliance_stop "$name" >/dev/null 2>&1 || true
      return 0
    fi
    sleep 1
  done
}

# Names of the containers this harness runs now.
appliance_list() {
  local dir
  [ -d "$APPLIANCE_STATE" ] || return 0
  for dir in "$APPLIANCE_STATE"/*/; do
    [ -f "$dir/pid1" ] && basename "$dir"
  done
  return 0
}
