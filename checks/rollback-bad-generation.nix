# VM test: a bad generation is rolled back. The box switches to a generation
# whose clinic application cannot start; the agent's heal fails and it rolls
# back through the root rollback unit. Negatives: the agent's user may start
# the rollback and switch units but not stop, restart or misuse them.
{ ... }:
{
  name = "rollback-bad-generation";

  nodes.machine =
    { lib, pkgs, ... }:
    {
      imports = [ ./lib/agent-node.nix ];
      virtualisation.memorySize = 2048;
      # The same system with a broken clinic application.
      specialisation.bad.configuration = {
        systemd.services.clinic-app.serviceConfig.ExecStart = lib.mkForce "${pkgs.coreutils}/bin/false";
        systemd.services.clinic-app.serviceConfig.Restart = "no";
      };
    };

  testScript = ''
    profile = "/nix/var/nix/profiles/system"

    start_all()
    machine.wait_for_unit("compliance-agent.service")
    machine.wait_for_unit("clinic-app.service")

    good = machine.succeed("readlink -f /run/current-system").strip()
    bad = machine.succeed("readlink -f /run/current-system/specialisation/bad").strip()
    # Generation 1: the good system; generation 2: the bad one.
    machine.succeed(f"nix-env --profile {profile} --set {good}")

    def switch_to_bad():
        # Only the good generation is left behind the bad one, so a rollback
        # lands on it.
        machine.succeed(f"nix-env --profile {profile} --delete-generations old")
        machine.succeed(f"nix-env --profile {profile} --set {bad}")
        machine.execute(f"{bad}/bin/switch-to-configuration switch")
        current = machine.succeed("readlink -f /run/current-system").strip()
        assert current == bad, f"expected to run the bad generation, got {current}"

    with subtest("negative: the agent's user cannot misuse the root units"):
        machine.fail("runuser -u compliance-agent -- systemctl stop compliance-agent-rollback.service")
        machine.fail("runuser -u compliance-agent -- systemctl start 'compliance-agent-switch@abc.service'")
        machine.fail("runuser -u compliance-agent -- systemctl restart 'compliance-agent-switch@1.service'")

    with subtest("the rollback unit, started as the agent's user, restores the good generation"):
        # The agent is stopped so that it does not roll back first.
        machine.systemctl("stop compliance-agent.service")
        switch_to_bad()
        machine.succeed("runuser -u compliance-agent -- systemctl start compliance-agent-rollback.service")
        current = machine.succeed("readlink -f /run/current-system").strip()
        assert current == good, f"expected the good generation after rollback, got {current}"
        machine.wait_for_unit("clinic-app.service")

    with subtest("the agent rolls back a bad generation by itself"):
        machine.systemctl("start compliance-agent.service")
        machine.wait_for_unit("compliance-agent.service")
        switch_to_bad()
        machine.wait_until_succeeds(f"test $(readlink -f /run/current-system) = {good}", timeout=600)
        machine.wait_for_unit("clinic-app.service")
        machine.wait_until_succeeds(
            "compliance-agent-admin evidence list --json"
            " | jq -e 'map(select(.rollback_generation != null or .outcome == \"reverted\")) | length > 0'",
            timeout=120,
        )
  '';
}
