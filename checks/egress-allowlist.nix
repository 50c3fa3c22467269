# VM test: egress to a host not on the allowlist is blocked (and logged) while
# the MCP stays reachable, and freshclam reaches the MSP's signature mirror
# through the allowlist. Four nodes on one vlan: the site box, a peer standing
# in for the MCP, the MSP's ClamAV mirror, and an outsider that is not
# allowlisted.
{ ... }:
let
  # A peer answering plain HTTP on `ports`, every request logged to the
  # journal of listener.service.
  webServer =
    ports:
    { pkgs, ... }:
    {
      networking.firewall.allowedTCPPorts = ports;
      systemd.services.listener = {
        wantedBy = [ "multi-user.target" ];
        script =
          builtins.concatStringsSep "" (
            map (port: "${pkgs.python3}/bin/python3 -m http.server ${toString port} &\n") ports
          )
          + "wait\n";
        serviceConfig.WorkingDirectory = "/var/empty";
      };
    };
in
{
  name = "egress-allowlist";

  nodes = {
    machine =
      { nodes, ... }:
      {
        imports = [ ./lib/agent-node.nix ];
        services.clamav.updater.enable = true;
        compliance.hardening.antivirus.mirrorUrl = "http://${nodes.avmirror.networking.primaryIPAddress}:8081";
      };
    # Named mcp so that agent-node.nix allowlists its address.
    mcp = webServer [
      8443
      8080
    ];
    # The MSP's signature mirror on 8081 (8080 is another service on that host).
    # It holds no databases, so freshclam's downloads fail there; what the test
    # shows is that they are asked for, through the allowlist.
    avmirror = webServer [
      8081
      8080
    ];
    outsider = webServer [
      8443
      8080
    ];
  };

  testScript =
    { nodes, ... }:
    let
      mcpIP = nodes.mcp.networking.primaryIPAddress;
      mirrorIP = nodes.avmirror.networking.primaryIPAddress;
      outsiderIP = nodes.outsider.networking.primaryIPAddress;
    in
    ''
      start_all()
      machine.wait_for_unit("nftables.service")
      mcp.wait_for_open_port(8443)
      avmirror.wait_for_open_port(8081)
      avmirror.wait_for_open_port(8080)
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

      with subtest("freshclam asks the MSP's mirror for signatures, through the allowlist"):
          conf = machine.succeed("cat /etc/clamav/freshclam.conf")
          assert "PrivateMirror http://${mirrorIP}:8081" in conf, f"expected the mirror in freshclam.conf, got {conf}"
          assert reach("${mirrorIP}", 8081), "expected the mirror to be reachable on 8081"
          machine.execute("systemctl start clamav-freshclam.service")
          avmirror.wait_until_succeeds(
              "journalctl -u listener.service --grep 'GET /(daily|main|bytecode)[.]c'", timeout=120
          )

      with subtest("negative: the mirror host on another port is blocked (control: it answers the MCP)"):
          mcp.succeed("curl --silent --max-time 3 --output /dev/null http://${mirrorIP}:8080/")
          assert not reach("${mirrorIP}", 8080), "expected egress to the mirror host on 8080 to be dropped"

      with subtest("the agent's own sandbox allows only the MCP"):
          out = machine.succeed("systemctl show -P IPAddressAllow compliance-agent.service")
          assert "${mcpIP}" in out, f"expected the MCP address in IPAddressAllow, got {out}"
          assert "${outsiderIP}" not in out, f"expected no outsider address in IPAddressAllow, got {out}"
    '';
}
