# VM test: a stopped service on the agent's list is healed, and the evidence
# of it verifies. Negatives: a unit not on the list is neither healed nor
# startable by the agent's user, and a tampered bundle fails verification.
{ ... }:
{
  name = "heal-stopped-service";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ ./lib/agent-node.nix ];
      systemd.services.not-allowlisted = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
          DynamicUser = true;
        };
      };
    };

  testScript = ''
    start_all()
    machine.wait_for_unit("compliance-agent.service")
    machine.wait_for_unit("clinic-app.service")
    machine.wait_for_unit("not-allowlisted.service")

    with subtest("a stopped allowlisted service is healed"):
        machine.succeed("systemctl stop clinic-app.service")
        machine.wait_until_succeeds("systemctl is-active clinic-app.service", timeout=180)

    with subtest("the heal left evidence that verifies"):
        machine.wait_until_succeeds(
            "compliance-agent-admin evidence list --json | jq -e 'map(select(.outcome == \"success\")) | length > 0'",
            timeout=120,
        )
        out = machine.succeed("compliance-agent-admin evidence verify 2>&1")
        print(out)

    with subtest("negative: a unit off the allowlist stays stopped"):
        machine.succeed("systemctl stop not-allowlisted.service")
        machine.sleep(60)
        state = machine.execute("systemctl is-active not-allowlisted.service")[1].strip()
        assert state != "active", f"expected not-allowlisted.service to stay stopped, got {state}"
        machine.fail("runuser -u compliance-agent -- systemctl start not-allowlisted.service")

    with subtest("negative: a tampered bundle fails verification"):
        bundle = machine.succeed(
            "find /var/lib/compliance-agent/evidence -name bundle.json | sort | tail -1"
        ).strip()
        assert bundle, "expected at least one bundle.json"
        machine.succeed(f"sed -i 's/\"success\"/\"failed\"/' {bundle}")
        machine.fail("compliance-agent-admin evidence verify")
  '';
}
