# VM test: an order from the MCP runs once; the same signed order replayed is
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

    with subtest("a signed order runs once"):
        started_before = restart_count()[1]
        order_id = mcp.succeed(
            "mcp-server order issue --data-dir $MCP_DATA_DIR --site test-site --host machine"
            " --runbook restart_unit --params '{\"unit\": \"clinic-app.service\"}' --ttl 600"
        ).strip()
        machine.wait_until_succeeds(
            f"compliance-agent-admin evidence list --json | jq -e 'map(select(.order_id == \"{order_id}\")) | length == 1'",
            timeout=120,
        )
        [first] = order_bundles(order_id)
        assert first["outcome"] == "success", f"expected the first delivery to succeed, got {first}"
        started_after = restart_count()[1]
        assert started_after != started_before, "expected the order to restart clinic-app.service"

    with subtest("negative: the same order replayed is rejected and nothing runs"):
        started_before = restart_count()[1]
        mcp.succeed(f"mcp-server order replay --data-dir $MCP_DATA_DIR --order-id {order_id}")
        machine.wait_until_succeeds(
            f"compliance-agent-admin evidence list --json | jq -e 'map(select(.order_id == \"{order_id}\")) | length == 2'",
            timeout=120,
        )
        outcomes = sorted(b["outcome"] for b in order_bundles(order_id))
        assert outcomes == ["rejected", "success"], f"expected one success and one rejection, got {outcomes}"
        started_after = restart_count()[1]
        assert started_after == started_before, "expected the replay not to restart clinic-app.service"

    with subtest("the rejection is reported to the MCP"):
        mcp.wait_until_succeeds(
            f"mcp-server order result --data-dir $MCP_DATA_DIR --order-id {order_id} --json | jq -e '.outcome == \"rejected\"'",
            timeout=120,
        )
  '';
}
