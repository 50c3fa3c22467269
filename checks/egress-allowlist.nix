# VM test: egress to a host not on the allowlist is blocked (and logged) while
# the MCP stays reachable. Three nodes on one vlan: the site box, a peer
# standing in for the MCP, and an outsider that is not allowlisted.
{ ... }:
let
  webServer =
    { pkgs, ... }:
    {
      networking.firewall.allowedTCPPorts = [
        8443
        8080
      ];
      systemd.services.listener = {
        wantedBy = [ "multi-user.target" ];
        script = ''
          ${pkgs.python3}/bin/python3 -m http.server 8443 &
          exec ${pkgs.python3}/bin/python3 -m http.server 8080
        '';
        serviceConfig.WorkingDirectory = "/etc";
      };
    };
in
{
  name = "egress-allowlist";

  nodes = {
    machine = {
      imports = [ ./lib/agent-node.nix ];
    };
    # Named mcp so that agent-node.nix allowlists its address.
    mcp = webServer;
    outsider = webServer;
  };

  testScript =
    { nodes, ... }:
    let
      mcpIP = nodes.mcp.networking.primaryIPAddress;
      outsiderIP = nodes.outsider.networking.primaryIPAddress;
    in
    ''
      start_all()
      machine.wait_for_unit("nftables.service")
      mcp.wait_for_open_port(8443)
      outsider.wait_for_open_port(8443)

      def reach(ip, port):
          return machine.execute(f"curl --silent --max-time 3 --output /dev/null http://{ip}:{port}/")[0] == 0

      with subtest("the MCP is reachable on its allowlisted port"):
          assert reach("${mcpIP}", 8443), "expected the MCP to be reachable on 8443"

      with subtest("negative: the outsider is blocked"):
          assert not reach("${outsiderIP}", 8443), "expected egress to the outsider to be dropped"

      with subtest("negative: the MCP on a port not allowlisted is blocked"):
          assert not reach("${mcpIP}", 8080), "expected egress to the MCP on 8080 to be dropped"

      with subtest("the drops are logged"):
          machine.wait_until_succeeds("journalctl -k --grep 'compliance-egress-drop: .*DST=${outsiderIP}'", timeout=30)

      with subtest("control: the outsider itself is up (the block is the ruleset's doing)"):
          mcp.succeed("curl --silent --max-time 3 --output /dev/null http://${outsiderIP}:8443/")

      with subtest("the agent's own sandbox allows only the MCP"):
          out = machine.succeed("systemctl show -P IPAddressAllow compliance-agent.service")
          assert "${mcpIP}" in out, f"expected the MCP address in IPAddressAllow, got {out}"
          assert "${outsiderIP}" not in out, f"expected no outsider address in IPAddressAllow, got {out}"
    '';
}
