# VM test: a disruptive fix ordered outside the maintenance window is
# deferred (signed "deferred" evidence, the unit is not touched); the same
# kind of order inside the window runs. The clock is set by the test, so
# time synchronisation is off on this node.
{ ... }:
{
  name = "maintenance-window";

  nodes = {
    machine =
      { lib, ... }:
      {
        imports = [ ./lib/agent-node.nix ];
        services.compliance-agent.maintenanceWindow = "02:00-04:00";
        services.compliance-agent.timezone = "UTC";
        compliance.hardening.timeSync.enable = false;
        services.timesyncd.enable = lib.mkForce false;
      };
    mcp.imports = [ ./lib/mcp-node.nix ];
  };

  testScript = ''
    import json

    def started():
        return machine.succeed("systemctl show -P ExecMainStartTimestampMonotonic clinic-app.service").strip()

    def issue():
        return mcp.succeed(
            "mcp-server-admin order create --host test-site/machine"
            " --runbook restart_unit --params '{\"unit\": \"clinic-app.service\"}' --ttl 3600"
        ).split()[0]

    def enroll():
        key = machine.succeed("cat /var/lib/compliance-agent-keys/signing.pub.pem")
        mcp.succeed(f"cat > /tmp/machine.pub.pem <<'EOF'\n{key}EOF")
        mcp.succeed("mcp-server-admin hosts add test-site/machine --pubkey /tmp/machine.pub.pem")

    def outcome_of(order_id):
        machine.wait_until_succeeds(
            f"compliance-agent-admin evidence list --json | jq -e 'map(select(.order_id == \"{order_id}\")) | length > 0'",
            timeout=120,
        )
        out = json.loads(machine.succeed("compliance-agent-admin evidence list --json"))
        return [b["outcome"] for b in out if b.get("order_id") == order_id][-1]

    start_all()
    mcp.wait_for_unit("mcp-server.service")
    machine.wait_for_unit("compliance-agent.service")
    machine.wait_for_unit("clinic-app.service")
    enroll()

    with subtest("outside the window the fix is deferred"):
        # 12:00 UTC, well outside 02:00-04:00; both nodes agree on the date.
        for node in (machine, mcp):
            node.succeed("date --utc --set '2030-06-01 12:00:00'")
        before = started()
        order_id = issue()
        outcome = outcome_of(order_id)
        assert outcome == "deferred", f"expected the order to be deferred, got {outcome}"
        assert started() == before, "expected clinic-app.service not to be restarted outside the window"

    with subtest("control: inside the window the same kind of fix runs"):
        for node in (machine, mcp):
            node.succeed("date --utc --set '2030-06-02 02:30:00'")
        before = started()
        order_id = issue()
        machine.wait_until_succeeds(
            f"compliance-agent-admin evidence list --json | jq -e 'map(select(.order_id == \"{order_id}\" and .outcome == \"success\")) | length > 0'",
            timeout=180,
        )
        assert started() != before, "expected clinic-app.service to be restarted inside the window"
  '';
}
