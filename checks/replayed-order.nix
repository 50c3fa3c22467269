# VM test: an order from the MCP runs once; an order replaying its nonce is
# refused with signed "rejected" evidence and nothing runs. The control is the
# first delivery, which does run.
{ ... }:
{
  name = "replayed-order";

  nodes = {
    machine.imports = [ ./lib/agent-node.nix ];
    mcp.imports = [ ./lib/mcp-node.nix ];
  };

  testScript = ''
    import json

    def enroll():
        key = machine.succeed("cat /var/lib/compliance-agent-keys/signing.pub.pem")
        mcp.succeed(f"cat > /tmp/machine.pub.pem <<'EOF'\n{key}EOF")
        mcp.succeed("mcp-server enroll --state $MCP_DATA_DIR --site test-site --host machine --pubkey /tmp/machine.pub.pem")

    def issue(nonce):
        return mcp.succeed(
            "mcp-server order --state $MCP_DATA_DIR --site test-site --host machine"
            " --runbook restart_unit --params '{\"unit\": \"clinic-app.service\"}' --ttl 600"
            f" --nonce {nonce}"
        ).strip()

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
        order_id = issue("replay-test-nonce-0001")
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
        replay_id = issue("replay-test-nonce-0001")
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
            "mcp-server list --state $MCP_DATA_DIR --site test-site --host machine --json"
            f" | jq -e '.results | map(select(.order_id == \"{replay_id}\" and .outcome == \"rejected\")) | length == 1'",
            timeout=120,
        )
  '';
}
