#!/usr/bin/env bash
# Scan benchmark, one run on one machine: `compliance-agent scan` in the
# appliance harness (real systemd, clamd with the live EICAR test, chrony,
# nftables, a restic repository, a Nix system profile) against
# `oscap xccdf eval` with the SCAP Security Guide's standard Debian profile and
# `lynis audit system --quick`, both on this host. Prints wall time, peak RSS
# and the number of checks each evaluated.
#
#   sudo bash tests/bench/scan.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
RUNS=${1:-10}
NAME="bench-scan-$$"

need() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" && return 0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}
for p in time openscap-scanner ssg-debian lynis; do need "$p"; done
command -v cargo >/dev/null || PATH="$HOME/.cargo/bin:$PATH"

cargo build --release -q -p compliance-agent
BIN_DIR="$ROOT/target/release"

cleanup() { bash tests/harness/boot.sh stop "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
PID1=$(bash tests/harness/boot.sh start "$NAME" --bind-ro="$BIN_DIR:/opt/agent-bin" | sed -n 's/^pid1=//p')
inside() { bash tests/harness/boot.sh exec "$NAME" "$@"; }
# shellcheck source=../harness/lib.sh
. tests/harness/lib.sh
CAPS=$(appliance_caps "$PID1")

# A backup repository with one snapshot, for the backup check.
inside sh -c 'mkdir -p /srv/ehr /var/backup && echo canary > /srv/ehr/canary.txt &&
  echo test-only-password > /etc/restic-password &&
  RESTIC_PASSWORD_FILE=/etc/restic-password restic -q -r /var/backup/repo init &&
  RESTIC_PASSWORD_FILE=/etc/restic-password restic -q -r /var/backup/repo backup /srv/ehr' >/dev/null
inside sh -c 'cat > /etc/compliance-agent-bench.json' <<'EOF'
{"version": 1, "policy_version": "bench",
 "units": [{"name": "prometheus-node-exporter.service", "active": true, "enabled": true},
           {"name": "dbus.service", "active": true, "enabled": false}],
 "checks": {
  "patching": {"system_profile": "/nix/var/nix/profiles/system", "target_system": null, "target_revision": null, "max_generation_age_days": 30},
  "av_health": {"units": ["clamav-daemon.service"], "clamd_socket": "/run/clamav/clamd.ctl", "database_dir": "/var/lib/clamav", "max_signature_age_hours": 48, "eicar_test": true},
  "backup": {"tool": "restic", "repository": "/var/backup/repo", "password_file": "/etc/restic-password", "unit": null, "max_snapshot_age_hours": 26, "restore_test_unit": null, "max_restore_test_age_days": null},
  "logging": {"journald_persistent": true, "journald_max_retention_sec": null, "auditd": false, "audit_rules": []},
  "firewall": {"unit": "nftables.service", "ruleset_file": "/etc/nftables.conf", "egress_policy": "drop", "ruleset_export_unit": null, "ruleset_export_file": null},
  "time_sync": {"unit": "chronyd.service", "servers": [], "max_offset_ms": 5000, "max_stratum": 10}
 }}
EOF

TMP=$(mktemp -d)
trap 'cleanup; rm -rf "$TMP"' EXIT

# One warm-up, then RUNS measured runs: wall clock from the host, peak RSS of the agent (GNU time over nsenter).
agent_scan() {
  inside /opt/agent-bin/compliance-agent scan --json --baseline /etc/compliance-agent-bench.json
}
agent_scan > "$TMP/report.json" || true
checks=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sum(1 for x in r["results"] if x["status"]!="not_applicable"), sum(1 for x in r["results"] if x["status"]=="compliant"))' "$TMP/report.json")
walls=()
rss=0
for _ in $(seq "$RUNS"); do
  start=$(date +%s%N)
  # nsenter execs the agent in the container: GNU time reports the agent's own peak RSS.
  /usr/bin/time -f %M -o "$TMP/rss" nsenter --target "$PID1" --mount --uts --ipc --net --pid --root --wd \
    /usr/bin/setpriv --bounding-set="$CAPS" -- \
    /opt/agent-bin/compliance-agent scan --baseline /etc/compliance-agent-bench.json >/dev/null || true
  end=$(date +%s%N)
  walls+=($(( (end - start) / 1000000 )))
  r=$(tail -n 1 "$TMP/rss"); [ "$r" -gt "$rss" ] && rss=$r
done
inner=$(inside sh -c 'start=$(date +%s%N); /opt/agent-bin/compliance-agent scan --no-evidence --baseline /etc/compliance-agent-bench.json >/dev/null; end=$(date +%s%N); echo $(( (end-start)/1000000 ))' || true)
ours_wall=$(printf '%s\n' "${walls[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')

# OpenSCAP, SCAP Security Guide, standard profile (the newest Debian content shipped).
DS=$(ls /usr/share/xml/scap/ssg/content/ssg-debian1*-ds.xml | grep -v -- '-1.2' | sort -V | tail -n 1)
start=$(date +%s%N)
/usr/bin/time -f %M -o "$TMP/oscap.rss" oscap xccdf eval --profile xccdf_org.ssgproject.content_profile_standard \
  --results "$TMP/oscap.xml" "$DS" > "$TMP/oscap.out" 2>&1 || true
end=$(date +%s%N)
oscap_wall=$(( (end - start) / 1000000 ))
oscap_rss=$(tail -n 1 "$TMP/oscap.rss")
oscap_evaluated=$(grep -cE '^Result[[:space:]]+(pass|fail|error|unknown)' "$TMP/oscap.out" || true)
oscap_total=$(grep -cE '^Result[[:space:]]+' "$TMP/oscap.out" || true)
oscap_checks="$oscap_evaluated/$oscap_total"

# Lynis, quick audit.
start=$(date +%s%N)
/usr/bin/time -f %M -o "$TMP/lynis.rss" lynis audit system --quick --no-colors --no-log --report-file "$TMP/lynis.dat" > "$TMP/lynis.out" 2>&1 || true
end=$(date +%s%N)
lynis_wall=$(( (end - start) / 1000000 ))
lynis_rss=$(tail -n 1 "$TMP/lynis.rss")
lynis_checks=$(sed -n 's/^tests_executed=//p' "$TMP/lynis.dat" | tr '|' '\n' | grep -c . || true)

read -r applicable compliant <<< "$checks"
printf '\n%-52s %10s %12s %8s\n' "scanner" "wall ms" "peak RSS MB" "checks"
printf '%-52s %10s %12.1f %8s\n' "compliance-agent scan (harness, median of $RUNS)" "$ours_wall" "$(echo "$rss/1024" | bc -l)" "$applicable"
printf '%-52s %10s %12s %8s\n' "  the same, timed inside the container, no evidence" "$inner" "-" "$applicable"
printf '%-52s %10s %12.1f %8s\n' "oscap xccdf eval, SSG standard ($(basename "$DS"))" "$oscap_wall" "$(echo "$oscap_rss/1024" | bc -l)" "$oscap_checks"
printf '%-52s %10s %12.1f %8s\n' "lynis audit system --quick" "$lynis_wall" "$(echo "$lynis_rss/1024" | bc -l)" "$lynis_checks"
echo
echo "compliance-agent: $compliant of $applicable applicable checks compliant, including the live EICAR test through clamd."
echo "oscap: $oscap_evaluated rules evaluated of $oscap_total in the profile (the rest not applicable to this platform)."
echo "The agent's wall time includes entering the container (nsenter) and writing one signed bundle per check."
echo "oscap and lynis run on the host itself (they are not installed in the container). Targets: under 250 ms and 15 MB."
