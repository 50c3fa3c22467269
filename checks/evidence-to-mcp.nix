# VM test: evidence reaches the MCP over mTLS, and survives the MCP being
# down: bundles made meanwhile wait in the queue and arrive once it is back.
# Negative: the MCP refuses clients without a certificate from its CA.
{ fixtures, ... }:
{
  name = "evidence-to-mcp";

  nodes = {
    machine.imports = [ ./lib/agent-node.nix ];
    mcp.imports = [ ./lib/mcp-node.nix ];
  };

  testScript = ''
    import json

    def received():
        out = mcp.succeed("mcp-server-admin evidence list --host test-site/machine --json")
        return set(json.loads(out)["bundles"])

    def enroll():
        key = machine.succeed("cat /var/lib/compliance-agent-keys/signing.pub.pem")
        mcp.succeed(f"cat > /tmp/machine.pub.pem <<'EOF'\n{key}EOF")
        mcp.succeed("mcp-server-admin hosts add test-site/machine --pubkey /tmp/machine.pub.pem")


    def local_bundles():
        out = machine.succeed("compliance-agent-admin evidence list --json")
        return {b["bundle_id"] for b in json.loads(out)}

    start_all()
    mcp.wait_for_unit("mcp-server.service")
    mcp.wait_for_open_port(8443)
    machine.wait_for_unit("compliance-agent.service")
    enroll()

    with subtest("negative: the MCP refuses clients without a certificate from its CA"):
        machine.fail("curl --silent --fail --cacert ${fixtures.pki}/ca.pem https://mcp:8443/api/v1/health")
        machine.fail(
            "curl --silent --fail --cacert ${fixtures.pki}/ca.pem"
            " --cert ${fixtures.pki}/rogue.pem --key ${fixtures.pki}/rogue.key https://mcp:8443/api/v1/health"
        )
        machine.succeed(
            "curl --silent --fail --cacert ${fixtures.pki}/ca.pem"
            " --cert ${fixtures.pki}/client.pem --key /var/lib/compliance-agent-keys/client.key https://mcp:8443/api/v1/health"
        )

    with subtest("evidence reaches the MCP"):
        machine.succeed("systemctl stop clinic-app.service")
        machine.wait_until_succeeds("systemctl is-active clinic-app.service", timeout=180)
        machine.wait_until_succeeds(
            "compliance-agent-admin queue status --json | jq -e '.stats.pending == 0'", timeout=180
        )
        missing = local_bundles() - received()
        assert not missing, f"expected every local bundle at the MCP, missing {missing}"

    with subtest("evidence made while the MCP is down is queued, then delivered"):
        mcp.systemctl("stop mcp-server.service")
        machine.succeed("systemctl stop clinic-app.service")
        machine.wait_until_succeeds("systemctl is-active clinic-app.service", timeout=180)
        machine.wait_until_succeeds(
            "compliance-agent-admin queue status --json | jq -e '.stats.pending > 0'", timeout=120
        )
        mcp.systemctl("start mcp-server.service")
        mcp.wait_for_open_port(8443)
        machine.wait_until_succeeds(
            "compliance-agent-admin queue status --json | jq -e '.stats.pending == 0'", timeout=300
        )
        missing = local_bundles() - received()
        assert not missing, f"expected the queued bundles at the MCP after its return, missing {missing}"

    with subtest("the MCP holds each bundle once, and the box's chain verifies"):
        # The server checks each upload's signature against the enrolled key and its chain link.
        out = json.loads(mcp.succeed("mcp-server-admin evidence list --host test-site/machine --json"))
        assert len(out["bundles"]) == len(set(out["bundles"])), f"expected no duplicates, got {out['bundles']}"
        machine.succeed("compliance-agent-admin evidence verify")
  '';
}
