#!/usr/bin/env bash
# Builds (or reuses) the appliance root file system for the tier-3 test harness.
#
#   bash tests/harness/build-rootfs.sh          # prints the root's path on the last line of stdout
#
# Two cached stages under target/appliance/ (APPLIANCE_CACHE_DIR overrides):
#
#   base-<hash>    debootstrap --variant=minbase bookworm plus packages.txt, installed
#                  with apt-get in a chroot. Keyed by packages.txt and BASE_STAGE below.
#   rootfs-<hash>  a copy of the base with the appliance configuration applied (the
#                  files under rootfs/ and configure_root below). Keyed by packages.txt,
#                  this script and every file under rootfs/.
#
# Each stage is built in a temporary directory and renamed into place only when it is
# complete, so an interrupted build never leaves a half root behind. A lock serialises
# concurrent callers (several tests booting at once): the second one waits and then
# reuses the first one's result. Stale stages (other hashes) are removed.
#
# Needs root. Installs debootstrap and systemd-container on the host when missing.
# Only the Debian mirror is contacted (APPLIANCE_MIRROR, default deb.debian.org).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${APPLIANCE_CACHE_DIR:-$REPO/target/appliance}
MIRROR=${APPLIANCE_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${APPLIANCE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
# Bump when the base stage's commands change (the package list is hashed anyway).
BASE_STAGE=1

log() { printf 'build-rootfs: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot)"

# --- host tools ---------------------------------------------------------------
need_pkgs=()
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || need_pkgs+=(systemd-container)
command -v nsenter >/dev/null 2>&1 || need_pkgs+=(util-linux)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need_pkgs+=(debian-archive-keyring)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing host packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

# --- hashes -------------------------------------------------------------------
packages=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$HERE/packages.txt" | awk 'NF' | sort -u)
[ -n "$packages" ] || die "packages.txt lists no package"
base_hash=$(printf 'suite=%s\nstage=%s\n%s\n' "$SUITE" "$BASE_STAGE" "$packages" | sha256sum | cut -c1-16)
root_hash=$(
  {
    printf 'base=%s\n' "$base_hash"
    sha256sum "$HERE/build-rootfs.sh"
    (cd "$HERE" && find rootfs -type f -print0 | sort -z | xargs -0 -r sha256sum)
    (cd "$HERE" && find rootfs -print0 | sort -z | xargs -0 -r stat -c '%n %a')
  } | sha256sum | cut -c1-16
)
BASE=$CACHE/base-$base_hash
ROOT=$CACHE/rootfs-$root_hash

mkdir -p "$CACHE"
# Keeps cargo and other tools from descending into the cache.
[ -e "$CACHE/CACHEDIR.TAG" ] || printf 'Signature: 8a477f597d28d172789f06886806bc55\n# appliance test harness cache\n' >"$CACHE/CACHEDIR.TAG"

if [ -e "$ROOT/.complete" ]; then
  echo "$ROOT"
  exit 0
fi

exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "another build holds $CACHE/.lock; waiting"
  flock 9
fi
if [ -e "$ROOT/.complete" ]; then
  echo "$ROOT"
  exit 0
fi

# Unmounts everything mounted at or below $1 (deepest first).
umount_below() {
  local dir=$1 m
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
}

# Removes a directory only after making sure nothing (a bind of the package cache,
# /proc) is still mounted inside it.
remove_tree() {
  local dir=$1
  [ -e "$dir" ] || return 0
  umount_below "$dir"
  if awk -v d="$dir" 'index($5, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    die "refusing to remove $dir: something is still mounted below it"
  fi
  rm -rf --one-file-system "$dir"
}

# Leftovers of interrupted builds (we hold the lock, so nobody is using them).
for d in "$CACHE"/.tmp-*; do
  [ -e "$d" ] && remove_tree "$d"
done

TMP=""
cleanup() {
  if [ -n "$TMP" ]; then remove_tree "$TMP"; fi
}
trap cleanup EXIT

in_root() { # runs a command in the chroot $TMP with a clean environment
  chroot "$TMP" /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

# --- stage 1: base ------------------------------------------------------------
build_base() {
  local started=$SECONDS
  TMP=$CACHE/.tmp-base-$$
  mkdir -p "$CACHE/debs"
  log "debootstrap $SUITE (minbase) into $TMP"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$TMP" "$MIRROR" >&2 || die "debootstrap failed"

  cat >"$TMP/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
  # Nothing starts services while we install into the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$TMP/usr/sbin/policy-rc.d"
  chmod 755 "$TMP/usr/sbin/policy-rc.d"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$TMP/etc/apt/apt.conf.d/90harness"

  mount -t proc proc "$TMP/proc"
  mount --bind /dev/pts "$TMP/dev/pts"
  mount --bind "$CACHE/debs" "$TMP/var/cache/apt/archives"
  log "apt-get install: $(printf '%s' "$packages" | tr '\n' ' ')"
  in_root apt-get update -qq >&2 || die "apt-get update in the chroot failed"
  # shellcheck disable=SC2086
  in_root apt-get install -y -q --no-install-recommends $packages >&2 \
    || die "apt-get install in the chroot failed"
  umount_below "$TMP/var/cache/apt/archives"
  umount_below "$TMP/dev/pts"
  umount_below "$TMP/proc"
  rm -f "$TMP/usr/sbin/policy-rc.d"
  rm -rf "$TMP"/var/lib/apt/lists/* "$TMP"/var/cache/apt/*.bin
  # shellcheck disable=SC2016 # dpkg-query's own format
  in_root dpkg-query -W -f '${Package} ${Version}\n' >"$TMP/.packages"
  date -u +%FT%TZ >"$TMP/.complete"
  mv -T "$TMP" "$BASE"
  TMP=""
  log "base built in $((SECONDS - started)) s: $BASE"
}

# --- stage 2: appliance configuration ----------------------------------------
# Runs inside the chroot (sh -s). Everything here is what the cached rootfs is.
configure_root() {
  cat <<'EOF'
set -eu

# Identity. No /etc/hostname: the container's hostname is its (unique) machine name.
rm -f /etc/hostname
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >/etc/hosts
ln -sf /usr/share/zoneinfo/Etc/UTC /etc/localtime
echo Etc/UTC >/etc/timezone
# A fixed machine id: an empty one would make every boot a "first boot", which runs
# systemd-firstboot and preset-all and would undo the unit states set below.
systemd-machine-id-setup >/dev/null 2>&1 || true
[ -s /etc/machine-id ] || cat /proc/sys/kernel/random/uuid | tr -d - >/etc/machine-id

# Units that cannot work in a container without network, or only slow the boot.
# auditd: the kernel refuses audit netlink requests from a container (no
# CAP_AUDIT_CONTROL, not the initial PID namespace); its tools stay installed.
for u in \
  console-getty.service getty@.service serial-getty@.service container-getty@.service getty.target \
  systemd-firstboot.service systemd-timesyncd.service \
  apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
  dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
  clamav-freshclam.service auditd.service \
  systemd-networkd-wait-online.service logrotate.timer; do
  systemctl disable --quiet "$u" 2>/dev/null || true
  ln -sfn /dev/null "/etc/systemd/system/$u"
done

# The services of the appliance baseline.
systemctl enable nftables.service chrony.service clamav-daemon.service \
  prometheus-node-exporter.service harness-current-system.service >/dev/null 2>&1

# The agent's own unprivileged user (the NixOS module creates it on real boxes).
getent group compliance-agent >/dev/null || groupadd --system compliance-agent
getent passwd compliance-agent >/dev/null || useradd --system --gid compliance-agent \
  --home-dir /var/lib/compliance-agent --no-create-home --shell /usr/sbin/nologin compliance-agent
install -d -o compliance-agent -g compliance-agent -m 0750 /var/lib/compliance-agent
install -d -m 0755 /opt/agent-bin /etc/compliance-agent

# ClamAV: the harness's own signature database, daily.cud (no network for freshclam).
install -d -o clamav -g clamav -m 0755 /var/lib/clamav
/usr/local/sbin/harness-clamav-db /var/lib/clamav
# Log to the journal only; the Debian default also writes /var/log/clamav.
sed -i -e 's/^LogFile /#LogFile /' -e 's/^LogSyslog .*/LogSyslog true/' /etc/clamav/clamd.conf
grep -q '^LocalSocket /var/run/clamav/clamd.ctl' /etc/clamav/clamd.conf || grep -q '^LocalSocket /run/clamav/clamd.ctl' /etc/clamav/clamd.conf

# Node exporter: loopback only, textfile collector directory for the agent's metrics.
install -d -m 0755 /var/lib/prometheus/node-exporter
printf '%s\n' 'ARGS="--web.listen-address=127.0.0.1:9100 --collector.textfile.directory=/var/lib/prometheus/node-exporter"' \
  >/etc/default/prometheus-node-exporter

# Chrony: no clock control (-x: the container may not set the host's clock).
printf '%s\n' 'DAEMON_OPTS="-F 1 -x"' >/etc/default/chrony

# Nix: a single-user store owned by root; no build users, no sandbox.
install -d -m 0755 /nix /nix/store /nix/var/nix/profiles /nix/var/nix/gcroots /etc/nix
cat >/etc/nix/nix.conf <<'NIX'
build-users-group =
sandbox = false
substituters =
experimental-features = nix-command
NIX
# Generation 1 of the system profile, so a fresh container has a running system.
sys=$(/usr/local/sbin/harness-make-system initial 0000000000000000000000000000000000000000)
nix-env -p /nix/var/nix/profiles/system --set "$sys"
rm -f /root/.nix-defexpr /root/.nix-profile /root/.nix-channels 2>/dev/null || true

# Persistent journal, as on the appliance.
install -d -m 2755 -g systemd-journal /var/log/journal

# Empty logs so the image is small and deterministic.
rm -f /var/log/*.log /var/log/apt/* /var/cache/debconf/*-old 2>/dev/null || true
EOF
}

build_root() {
  local started=$SECONDS
  TMP=$CACHE/.tmp-rootfs-$$
  log "configuring $ROOT from $(basename "$BASE")"
  cp -a --reflink=auto "$BASE" "$TMP"
  rm -f "$TMP/.complete"
  cp -a --no-preserve=ownership "$HERE/rootfs/." "$TMP/"
  mount -t proc proc "$TMP/proc"
  # nix-build needs a pseudo terminal for the builder's log.
  mount --bind /dev/pts "$TMP/dev/pts"
  in_root /bin/sh -s < <(configure_root) >&2 || die "configuring the root failed"
  umount_below "$TMP/dev/pts"
  umount_below "$TMP/proc"
  {
    echo "base $base_hash"
    echo "rootfs $root_hash"
    date -u +%FT%TZ
  } >"$TMP/.complete"
  mv -T "$TMP" "$ROOT"
  TMP=""
  log "root configured in $((SECONDS - started)) s: $ROOT"
}

[ -e "$BASE/.complete" ] || build_base
build_root

# Drop stages of other hashes; a booted container only uses its own copy or overlay.
for d in "$CACHE"/base-* "$CACHE"/rootfs-*; do
  [ -e "$d" ] || continue
  case $d in "$BASE" | "$ROOT") continue ;; esac
  if [ -n "${APPLIANCE_KEEP_STALE:-}" ]; then continue; fi
  log "removing stale $(basename "$d")"
  remove_tree "$d" || true
done

echo "$ROOT"
