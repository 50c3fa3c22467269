# VM test: an order from the MCP runs once; an order replaying its nonce is
# refused with signed "rejected" evidence and nothing runs. The control is the
# first delivery, which does run. The central server never signs a nonce twice,
# so the replay plays a compromised server: the test re-signs the first order's
# payload under a new order id with the (fixture) order key and lists it by
# writing it into the server's database.
{ fixtures, ... }:
{
  name = "replayed-order";

  nodes = {
    machine.imports = [ ./lib/agent-node.nix ];
    mcp =
      { pkgs, ... }:
      {
        imports = [ ./lib/mcp-node.nix ];
        environment.systemPackages = [
          pkgs.sqlite
          pkgs.openssl
        ];
      };
  };

  testScript = ''
    import base64
    import json
    import uuid

    PAYLOAD_TYPE = "application/vnd.compliance-agent.order+json"

    def enroll():
        key = machine.succeed("cat /var/lib/compliance-agent-keys/signing.pub.pem")
        mcp.succeed(f"cat > /tmp/machine.pub.pem <<'EOF'\n{key}EOF")
        mcp.succeed("mcp-server-admin hosts add test-site/machine --pubkey /tmp/machine.pub.pem")

    def issue():
        return mcp.succeed(
            "mcp-server-admin order create --host test-site/machine"
            " --runbook restart_unit --params '{\"unit\": \"clinic-app.service\"}' --ttl 600"
        ).split()[0]

    def replay(order_id):
        """Signs the order's payload again under a new id (same nonce) and lists it."""
        orders = json.loads(mcp.succeed("mcp-server-admin order list --host test-site/machine --json"))["orders"]
        [record] = [o for o in orders if o["order_id"] == order_id]
        payload = json.loads(base64.b64decode(json.loads(record["envelope"])["payload"]))
        payload["order_id"] = str(uuid.uuid4())
        body = json.dumps(payload).encode()
        pae = f"DSSEv1 {len(PAYLOAD_TYPE)} {PAYLOAD_TYPE} {len(body)} ".encode() + body
        mcp.succeed(f"echo {base64.b64encode(pae).decode()} | base64 -d > /tmp/pae")
        sig = mcp.succeed(
            "openssl pkeyutl -sign -rawin -inkey ${fixtures.pki}/order-signing.key -in /tmp/pae | base64 -w0"
        ).strip()
        envelope = json.dumps({
            "payload": base64.b64encode(body).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": "", "sig": sig}],
        })
        mcp.succeed(f"cat > /tmp/replay.sql <<'EOF'\n"
                    "INSERT INTO orders (order_id, site_id, host_id, runbook_id, params, ttl, state, envelope, created_by, created_at)"
                    f" VALUES ('{payload['order_id']}', 'test-site', 'machine', 'restart_unit', '{{}}', 600, 'pending',"
                    f" '{envelope}', 'test:compromised-server', 0);\nEOF")
        mcp.succeed("runuser -u mcp-server -- sqlite3 /var/lib/mcp-server/mcp.db < /tmp/replay.sql")
        return payload["order_id"]

    def order_bundles(order_id):
        out = machine.succeed("compliance-agent-admin evidence list --json")
        return [b for b in json.loads(out) if b.get("order_id") == order_id]

    def restart_count():
        return int(machine.succeed("systemctl show -P NRestarts clinic-app.service").strip() or 0), \
            machine.succeed("systemctl show -P ExecMainStartTimestampMonotonic clinic-app.service").strip()

    start_all()
    mcp.wait_for_unit("mcp-server.service")
    machine.wait_for_unit("compliance-agent.service")
    machine.wait_for_unit("clinic-app.service")
    enroll()

    with subtest("a signed order runs once"):
        started_before = restart_count()[1]
        order_id = issue()
        machine.wait_until_succeeds(
            f"compliance-agent-admin evidence list --json | jq -e 'map(select(.order_id == \"{order_id}\")) | length == 1'",
            timeout=120,
        )
        [first] = order_bundles(order_id)
        assert first["outcome"] == "success", f"expected the first delivery to succeed, got {first}"
        started_after = restart_count()[1]
        assert started_after != started_before, "expected the order to restart clinic-app.service"

    with subtest("negative: an order replaying the nonce is rejected and nothing runs"):
        started_before = restart_count()[1]
        replay_id = replay(order_id)
        machine.wait_until_succeeds(
            f"compliance-agent-admin evidence list --json | jq -e 'map(select(.order_id == \"{replay_id}\")) | length == 1'",
            timeout=120,
        )
        [replayed] = order_bundles(replay_id)
        assert replayed["outcome"] == "rejected", f"expected the replay to be rejected, got {replayed}"
        started_after = restart_count()[1]
        assert started_after == started_before, "expected the replay not to restart clinic-app.service"

    with subtest("the rejection is reported to the MCP"):
        mcp.wait_until_succeeds(
            "mcp-server-admin order list --host test-site/machine --json"
            f" | jq -e '.orders | map(select(.order_id == \"{replay_id}\" and .result_outcome == \"rejected\")) | length == 1'",
            timeout=120,
        )
  '';
}
