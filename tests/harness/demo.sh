#!/usr/bin/env bash
# The whole platform in one command: the central server with its console on this
# machine, three appliance containers with the real agent as a systemd service,
# enrolled by token, delivering evidence, then drift injected on a timer and
# remediated through incidents, plans and signed orders while one watches.
#
#   sudo bash tests/harness/demo.sh           run until Ctrl-C
#   sudo bash tests/harness/demo.sh --once    boot, enroll, one drift healed through its
#                                             incident, then exit 0 (nonzero with the reason)
#
# Environment: DEMO_SHORT=1 (same as --once), DEMO_TIMEOUT (seconds the --once run may
# take, default 300), DEMO_DRIFT_EVERY (seconds between drifts, default 40),
# DEMO_BIN_DIR (use the compliance-agent and mcp-server binaries there instead of
# building them), DEMO_SCAN_INTERVAL (the boxes' full scan, default 10 s).
#
# Network: the containers have only loopback (--private-network). In each one a socat
# unit listens on 127.0.0.1:8443 and forwards to a Unix socket bind-mounted from the
# host; on the host a socat forwards that socket to the server's agent listener. TLS
# runs end to end through both (socat only moves bytes), so the box pins the server's
# CA and presents its client certificate exactly as across a real network.
#
# Everything started here (containers, server, socat, the temporary directory) is
# removed on exit, Ctrl-C or any error; the cleanup is idempotent.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ONCE=${DEMO_SHORT:-0}
case ${1:-} in
  --once) ONCE=1 ;;
  "") ;;
  -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "demo: unknown argument '$1' (use --once, or nothing)" >&2; exit 2 ;;
esac
TIMEOUT=${DEMO_TIMEOUT:-300}
DRIFT_EVERY=${DEMO_DRIFT_EVERY:-40}
SCAN_INTERVAL=${DEMO_SCAN_INTERVAL:-10}
START=$SECONDS

ts() { date -u +%H:%M:%S; }
say() { printf '%s  %s\n' "$(ts)" "$*"; }
die() {
  printf '%s  demo failed: %s\n' "$(ts)" "$*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: sudo bash tests/harness/demo.sh (systemd-nspawn needs it)"

# --- host packages ----------------------------------------------------------------
# socat (the bridge), jq (reading the server's JSON), nix-bin (nix-instantiate renders
# the polkit rule and root helpers with the NixOS module's own functions), curl; the
# harness's own (debootstrap, systemd-container) are installed by build-rootfs.sh.
need=()
for p in socat jq nix-bin curl ca-certificates util-linux; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- state and cleanup ------------------------------------------------------------
# shellcheck source=lib.sh
. "$HERE/lib.sh"
TMP=$(mktemp -d /tmp/compliance-demo.XXXXXX)
chmod 0755 "$TMP"
BOXES=()
PIDS=()
CLEANED=0
cleanup() {
  local status=$?
  [ "$CLEANED" -eq 1 ] && return 0
  CLEANED=1
  trap - EXIT INT TERM
  set +e
  local pid name stops=()
  # The boxes first, in parallel, while the server still answers their last uploads.
  for name in "${BOXES[@]}"; do
    if [ -d "$(appliance_state_dir "$name")" ]; then
      appliance_stop "$name" >/dev/null 2>&1 &
      stops+=("$!")
    fi
  done
  for pid in "${stops[@]}"; do wait "$pid"; done
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  rm -rf --one-file-system "$TMP"
  printf '%s  cleaned up: %s container(s), %s process(es), %s\n' "$(ts)" "${#BOXES[@]}" "${#PIDS[@]}" "$TMP"
  return "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The containers stop themselves (lib.sh's watcher) if this shell dies without cleaning up.
export APPLIANCE_OWNER_PID=$$

# --- binaries ---------------------------------------------------------------------
if [ -n "${DEMO_BIN_DIR:-}" ]; then
  BIN=$(cd "$DEMO_BIN_DIR" && pwd)
else
  if ! command -v cargo >/dev/null 2>&1; then
    for dir in "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin}" "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
      [ -n "$dir" ] && [ -x "$dir/cargo" ] && PATH="$dir:$PATH"
    done
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain >= 1.89, or set DEMO_BIN_DIR"
  say "building compliance-agent and mcp-server (cargo build)"
  (cd "$REPO" && cargo build -q -p compliance-agent -p mcp-server) || die "cargo build failed"
  BIN=$REPO/target/debug
fi
for b in compliance-agent mcp-server; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing (cargo build -p compliance-agent -p mcp-server)"
done

# --- the central server -----------------------------------------------------------
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    ss -Hltn "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return; }
  done
}
AGENT_PORT=$(free_port)
OPERATOR_PORT=$(free_port)
[ "$AGENT_PORT" != "$OPERATOR_PORT" ] || OPERATOR_PORT=$((AGENT_PORT + 1))
CFG=$TMP/mcp-server.toml
# The embedded default plus what the demo needs: its own ports and state, every site
# in executor mode auto with the runbooks the drifts need on its allowlist, a short
# central cooldown, and restart_unit treated as non-disruptive (the clinic's app is
# not one of the boxes' service_health_checks units either), so the executor signs
# the orders itself instead of waiting for a second operator.
cat >"$CFG" <<EOF
state_dir = "$TMP/mcp"
agent_listen = "127.0.0.1:$AGENT_PORT"
operator_listen = "127.0.0.1:$OPERATOR_PORT"
default_scan_interval_sec = $SCAN_INTERVAL

[orders]
cooldown_sec = 20
disruptive_runbooks = ["switch_generation", "rollback_generation", "stop_unit"]
default_site_allowlist = ["collect_evidence", "restart_unit", "reapply_firewall", "refresh_av_signatures"]

[remediation]
default_site_mode = "auto"
worker_interval_ms = 500
sweep_interval_sec = 10
EOF
MCP=("$BIN/mcp-server" --config "$CFG")
"${MCP[@]}" serve >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
for _ in $(seq 300); do
  [ -s "$TMP/mcp/admin.token" ] && ss -Hltn "sport = :$OPERATOR_PORT" | grep -q . && break
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 20 "$TMP/server.log" >&2; die "mcp-server serve exited"; }
  sleep 0.1
done
[ -s "$TMP/mcp/admin.token" ] || die "the server wrote no admin token in 30 s ($TMP/server.log)"
ADMIN_TOKEN=$(cat "$TMP/mcp/admin.token")
say "central server: pid $SERVER_PID, state $TMP"
say "console: https://127.0.0.1:$OPERATOR_PORT/console/  (self-signed: the server's own CA, $TMP/mcp/ca/)"
say "sign-in token: $ADMIN_TOKEN"

# The host's end of the bridge: a Unix socket every container sees, forwarded to the agent listener.
mkdir -p "$TMP/bridge"
socat "UNIX-LISTEN:$TMP/bridge/agent.sock,fork,mode=0666" "TCP:127.0.0.1:$AGENT_PORT" 2>>"$TMP/bridge.log" &
PIDS+=("$!")

# --- the boxes --------------------------------------------------------------------
ROOTFS=$(bash "$HERE/build-rootfs.sh" 2>>"$TMP/rootfs.log" | tail -n 1) || die "build-rootfs.sh failed ($TMP/rootfs.log)"

nix_eval() {
  (cd "$REPO" && NIX_CONF_DIR="$REPO/tests/nix-conf" NIX_CONFIG='' nix-instantiate --eval --strict --json -E "$1")
}
HELPERS=$(nix_eval 'import ./modules/lib/root-helpers.nix { systemProfile = "/nix/var/nix/profiles/system"; rulesetFile = "/etc/nftables.conf"; }') \
  || die "nix-instantiate could not render modules/lib/root-helpers.nix"
POLKIT=$(nix_eval 'import ./modules/lib/polkit-rule.nix { user = "compliance-agent"; manageUnits = [ "clinic-app.service" "nftables.service" "prometheus-node-exporter.service" "chrony.service" "clamav-daemon.service" ]; startUnits = [ "compliance-agent-rollback.service" "compliance-agent-nft-export.service" "clamav-freshclam.service" ]; startTemplates = [ "compliance-agent-switch@" ]; }' | jq -r .) \
  || die "nix-instantiate could not render modules/lib/polkit-rule.nix"

STATE=/var/lib/compliance-agent
in_box() { appliance_exec "$@"; }
put() { # put BOX PATH MODE < content
  in_box "$1" /bin/sh -c "mkdir -p \"\$(dirname '$2')\" && cat > '$2' && chmod $3 '$2'"
}

# BOX SITE HOST RESELLER
setup_box() {
  local box=$1 site=$2 host=$3 reseller=$4 key
  put "$box" /etc/systemd/system/clinic-app.service 0644 <<'EOF'
[Unit]
Description=Clinic application
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
EOF
  for key in switch rollback nftExport; do
    local name
    case $key in
      switch) name=compliance-agent-switch ;;
      rollback) name=compliance-agent-rollback ;;
      nftExport) name=compliance-agent-nft-export ;;
    esac
    { printf '#!/bin/bash\n'; jq -r ".$key" <<<"$HELPERS"; } | put "$box" "/usr/local/libexec/$name" 0755
  done
  put "$box" /etc/systemd/system/compliance-agent-switch@.service 0644 <<'EOF'
[Unit]
Description=Switch to system generation %i
[Service]
Type=oneshot
ExecStart=/usr/local/libexec/compliance-agent-switch %i
EOF
  printf '[Service]\nType=oneshot\nExecStart=/usr/local/libexec/compliance-agent-rollback\n' \
    | put "$box" /etc/systemd/system/compliance-agent-rollback.service 0644
  printf '[Service]\nType=oneshot\nRuntimeDirectory=compliance-agent-export\nRuntimeDirectoryMode=0755\nRuntimeDirectoryPreserve=yes\nExecStart=/usr/local/libexec/compliance-agent-nft-export\n' \
    | put "$box" /etc/systemd/system/compliance-agent-nft-export.service 0644
  # freshclam has no network in the container (the harness masks it). In its place a
  # oneshot that installs a current signature database, as a local mirror would, and
  # tells clamd to reload: what refresh_av_signatures starts.
  in_box "$box" rm -f /etc/systemd/system/clamav-freshclam.service
  put "$box" /etc/systemd/system/clamav-freshclam.service 0644 <<'EOF'
[Unit]
Description=ClamAV signature update (demo: a current database from the local generator)
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'harness-clamav-db --version $$(( $$(date +%%s) / 60 )) && printf "zRELOAD\\0" | socat - UNIX-CONNECT:/run/clamav/clamd.ctl'
EOF
  printf '%s\n' "$POLKIT" | put "$box" /etc/polkit-1/rules.d/60-compliance-agent.rules 0644
  # The box's end of the bridge.
  put "$box" /etc/systemd/system/demo-mcp-bridge.service 0644 <<'EOF'
[Unit]
Description=Demo bridge: 127.0.0.1:8443 to the central server on the host
[Service]
ExecStart=/usr/bin/socat TCP-LISTEN:8443,bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:/run/demo-bridge/agent.sock
Restart=always
EOF
  in_box "$box" /bin/sh -c "systemctl daemon-reload && systemctl start clinic-app.service demo-mcp-bridge.service" >/dev/null
  in_box "$box" /bin/sh -c "mkdir -p $STATE && /opt/agent-bin/compliance-agent keygen --out $STATE/keys >/dev/null && chown -R compliance-agent:compliance-agent $STATE && chmod 0700 $STATE"
  local identity="site_id = \"$site\"
host_id = \"$host\"
deployment_mode = \"reseller\"
reseller_id = \"$reseller\"
signing_key_file = \"$STATE/keys/signing.key\"
state_dir = \"$STATE\"
evidence_dir = \"$STATE/evidence\""
  printf '%s\n' "$identity" | put "$box" /etc/compliance-agent/enroll.toml 0644
  # The box's own cooldown for restarts is long: a service that keeps dying is not
  # restarted in a loop by the box; the MSP's server takes over (an incident, a plan,
  # an order), which is what the demo shows.
  cat <<EOF | put "$box" /etc/compliance-agent/agent.toml 0644
$identity
baseline_path = "/etc/compliance-agent/baseline.json"
maintenance_window = "00:00-23:59"
timezone = "UTC"
health_check_timeout_sec = 3
mcp_url = "https://127.0.0.1:8443"
ca_cert_file = "$STATE/mcp/ca.pem"
client_cert_file = "$STATE/mcp/client.pem"
client_key_file = "$STATE/mcp/client.key"
mcp_order_pubkey_file = "$STATE/mcp/order-signing.pub.pem"
mcp_poll_interval_sec = 5
upload_backoff_base_sec = 1
upload_backoff_cap_sec = 4
restart_cooldown_sec = 3600
order_runbook_allowlist = ["collect_evidence", "restart_unit", "reapply_firewall", "refresh_av_signatures"]
metrics_dir = "/var/lib/prometheus/node-exporter"
EOF
  put "$box" /etc/compliance-agent/baseline.json 0644 <<'EOF'
{"version": 1, "policy_version": "demo",
 "units": [
   {"name": "clinic-app.service", "active": true, "enabled": false},
   {"name": "prometheus-node-exporter.service", "active": true, "enabled": true}],
 "checks": {
   "patching": {"system_profile": "/nix/var/nix/profiles/system", "target_system": null, "target_revision": null, "max_generation_age_days": 30},
   "av_health": {"units": ["clamav-daemon.service"], "clamd_socket": "/run/clamav/clamd.ctl", "database_dir": "/var/lib/clamav", "max_signature_age_hours": 48, "eicar_test": true},
   "logging": {"journald_persistent": true, "journald_max_retention_sec": null, "auditd": false, "audit_rules": []},
   "firewall": {"unit": "nftables.service", "ruleset_file": "/etc/nftables.conf", "egress_policy": "drop",
                "ruleset_export_unit": "compliance-agent-nft-export.service",
                "ruleset_export_file": "/run/compliance-agent-export/ruleset.json",
                "expected_export_file": "/run/compliance-agent-export/expected.json"},
   "time_sync": {"unit": "chronyd.service", "servers": [], "max_offset_ms": 5000, "max_stratum": 10}}}
EOF
  # Enrollment by a one-time token.
  local token
  token=$(
    if [ -n "$reseller" ]; then
      "${MCP[@]}" token create --site "$site" --reseller "$reseller" 2>>"$TMP/cli.log"
    else
      "${MCP[@]}" token create --site "$site" 2>>"$TMP/cli.log"
    fi
  ) || die "token create --site $site failed ($TMP/cli.log)"
  in_box "$box" /opt/agent-bin/compliance-agent --config /etc/compliance-agent/enroll.toml \
    enroll --server https://127.0.0.1:8443 --token "$token" >>"$TMP/enroll.log" 2>&1 \
    || { cat "$TMP/enroll.log" >&2; die "$site/$host could not enroll"; }
  in_box "$box" chown -R compliance-agent:compliance-agent "$STATE/mcp"
  put "$box" /etc/systemd/system/compliance-agent.service 0644 <<EOF
[Unit]
Description=HIPAA compliance agent
[Service]
Type=notify
User=compliance-agent
ExecStart=/opt/agent-bin/compliance-agent --config /etc/compliance-agent/agent.toml run --scan-interval $SCAN_INTERVAL
WatchdogSec=30
Restart=on-failure
RestartSec=1
TimeoutStopSec=10
EOF
  in_box "$box" /bin/sh -c "systemctl daemon-reload && systemctl start compliance-agent.service" \
    || { in_box "$box" journalctl -u compliance-agent.service --no-pager -n 15 -o cat >&2; die "$site/$host: the agent service did not start"; }
  say "enrolled $site/$host (reseller ${reseller:-none}) by token; agent running as a service"
}

SITES=(clinic-north clinic-south harbor-dental)
HOSTS=(frontdesk-01 exam-02 office-01)
RESELLERS=(acme-msp acme-msp bayside-it)
for i in 0 1 2; do
  name="demo-$$-$((i + 1))"
  BOXES+=("$name")
  appliance_start "$name" "$ROOTFS" --bind-ro="$BIN:/opt/agent-bin" --bind="$TMP/bridge:/run/demo-bridge" \
    >"$TMP/boot-$name.log" 2>&1 || { cat "$TMP/boot-$name.log" >&2; die "container $name did not boot"; }
  say "booted appliance container $name ($(grep '^boot_ms=' "$TMP/boot-$name.log" | cut -d= -f2) ms)"
done
for i in 0 1 2; do
  setup_box "${BOXES[$i]}" "${SITES[$i]}" "${HOSTS[$i]}" "${RESELLERS[$i]}"
done

# Evidence from every box on the server.
delivered() { "${MCP[@]}" evidence list --host "$1" --json 2>/dev/null | jq -r '.bundles | length' 2>/dev/null || echo 0; }
for i in 0 1 2; do
  h="${SITES[$i]}/${HOSTS[$i]}"
  for _ in $(seq 120); do
    n=$(delivered "$h")
    [ "${n:-0}" -gt 0 ] && break
    [ $((SECONDS - START)) -lt "$TIMEOUT" ] || die "no evidence from $h within ${TIMEOUT}s"
    sleep 1
  done
  [ "${n:-0}" -gt 0 ] || die "no evidence from $h after 120 s"
  say "evidence from $h: $n signed bundles verified and archived by the server"
done
"${MCP[@]}" status 2>/dev/null | sed "s/^/$(ts)  | /" || true

# --- the live log -----------------------------------------------------------------
# Follows the server's incidents and prints each step of their timelines once:
# opened, plan, order signed, the box's result, closed.
SEEN=$TMP/seen
: >"$SEEN"
follow() {
  local list id
  list=$("${MCP[@]}" incidents list --json 2>/dev/null) || return 0
  for id in $(jq -r '(.incidents // .)[] | .incident_id' <<<"$list" 2>/dev/null); do
    grep -qxF "$id/done" "$SEEN" && continue
    "${MCP[@]}" incidents show "$id" --json 2>/dev/null | jq -r --arg id "$id" '
      (.incident // .) as $i | ($i.site_id + "/" + $i.host_id) as $h |
      ((.timeline // [])[] | [$id, (.id | tostring), (.at | tostring), .kind, $h, $i.cause, $i.severity,
        (($i.remediation_sec // "") | tostring), ((.detail // "") | gsub("[\t\n\u001f]"; " "))] | join("\u001f"))' 2>/dev/null
  done | while IFS=$'\x1f' read -r id eid at kind host cause severity took detail; do
    grep -qxF "$id/$eid" "$SEEN" && continue
    echo "$id/$eid" >>"$SEEN"
    local t=${at:11:8} short=${id:0:8}
    case $kind in
      evidence)
        if ! grep -qxF "$id/opened" "$SEEN"; then
          echo "$id/opened" >>"$SEEN"
          printf '%s  incident opened  %s %s on %s, severity %s: %s\n' "$t" "$short" "$cause" "$host" "$severity" "$detail"
        else
          printf '%s  incident updated %s: %s\n' "$t" "$short" "$detail"
        fi
        ;;
      plan) printf '%s  plan             %s: %s\n' "$t" "$short" "$detail" ;;
      order) printf '%s  order signed     %s: %s\n' "$t" "$short" "$detail" ;;
      order_result) printf '%s  result           %s: %s\n' "$t" "$short" "$detail" ;;
      resolved | closed)
        echo "$id/done" >>"$SEEN"
        printf '%s  incident closed  %s: %s (remediated in %s s)\n' "$t" "$short" "$detail" "${took:-?}" ;;
      *) printf '%s  %-16s %s: %s\n' "$t" "$kind" "$short" "$detail" ;;
    esac
  done
}
incident_state() { # HOST CAUSE -> state of the newest incident, or nothing
  "${MCP[@]}" incidents list --host "$1" --json 2>/dev/null \
    | jq -r --arg c "$2" '[(.incidents // .)[] | select(.cause == $c)] | first | .state // empty' 2>/dev/null
}
unit_active() { [ "$(in_box "$1" systemctl is-active "$2" 2>/dev/null)" = active ]; }

# --- drifts -----------------------------------------------------------------------
stop_service() { # BOX HOST
  say "drift injected   $2: systemctl stop clinic-app.service"
  in_box "$1" systemctl stop clinic-app.service
}
flush_firewall() {
  say "drift injected   $2: nft flush ruleset"
  in_box "$1" nft flush ruleset
}
stale_signatures() {
  say "drift injected   $2: ClamAV signatures built 10 days ago"
  in_box "$1" harness-clamav-db --version 26000 --time "$(($(date +%s) - 10 * 86400))"
  in_box "$1" /bin/sh -c 'printf "zRELOAD\0" | socat - UNIX-CONNECT:/run/clamav/clamd.ctl' >/dev/null
}

if [ "$ONCE" = 1 ]; then
  box=${BOXES[0]}
  host="${SITES[0]}/${HOSTS[0]}"
  # A first stop the box heals itself at once (its unit watch); its restart cooldown starts.
  stop_service "$box" "$host"
  for _ in $(seq 60); do unit_active "$box" clinic-app.service && break; sleep 0.5; done
  unit_active "$box" clinic-app.service || die "the box did not restart clinic-app.service itself"
  say "healed on the box: clinic-app.service restarted by the agent itself (no incident)"
  sleep 2
  # The second stop falls in the box's cooldown: the box reports it and the MSP's server acts.
  stop_service "$box" "$host"
  state=""
  while :; do
    follow
    state=$(incident_state "$host" check:services)
    [ "$state" = resolved ] && break
    [ $((SECONDS - START)) -lt "$TIMEOUT" ] || die "incident for $host check:services is '${state:-not opened}' after ${TIMEOUT}s"
    sleep 1
  done
  follow
  unit_active "$box" clinic-app.service || die "the incident closed but clinic-app.service is not active"
  say "demo complete: drift healed through incident, plan and signed order in $((SECONDS - START)) s"
  exit 0
fi

say "injecting drift every ${DRIFT_EVERY}s; watch the console; Ctrl-C stops and removes everything"
round=0
next=$SECONDS
while :; do
  follow
  if [ "$SECONDS" -ge "$next" ]; then
    i=$((round % 3))
    case $((round % 3)) in
      0)
        stop_service "${BOXES[$i]}" "${SITES[$i]}/${HOSTS[$i]}"
        # Restarted within seconds by the box itself, or left to the MSP within its cooldown.
        for _ in 1 2 3 4 5 6; do
          sleep 0.5
          if unit_active "${BOXES[$i]}" clinic-app.service; then
            say "healed on the box: clinic-app.service restarted by the agent itself (no incident)"
            break
          fi
        done
        unit_active "${BOXES[$i]}" clinic-app.service \
          || say "not restarted by the box (its restart cooldown): the box reports it to the server"
        ;;
      1) flush_firewall "${BOXES[$i]}" "${SITES[$i]}/${HOSTS[$i]}" ;;
      2) stale_signatures "${BOXES[$i]}" "${SITES[$i]}/${HOSTS[$i]}" ;;
    esac
    round=$((round + 1))
    next=$((SECONDS + DRIFT_EVERY))
  fi
  sleep 1
done
