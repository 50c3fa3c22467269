# The `mcp` node: the workspace's reference MCP server over mTLS on 8443,
# trusting only the test CA, signing orders with the test order key.
# Command-line contract of mcp-server: docs/DECISIONS.md ("What the VM tests expect").
{
  lib,
  pkgs,
  fixtures,
  ...
}:
let
  dataDir = "/var/lib/mcp-server";
in
{
  assertions = [
    {
      assertion = fixtures.mcpServer != null;
      message = "the VM tests need the reference MCP server: add tests/mcp-server to the Cargo workspace (package and binary mcp-server).";
    }
  ];
  networking.firewall.allowedTCPPorts = [ 8443 ];
  systemd.services.mcp-server = {
    description = "Reference MCP server (tests)";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    serviceConfig = {
      ExecStart = lib.concatStringsSep " " [
        "${fixtures.mcpServer}/bin/mcp-server serve"
        "--listen 0.0.0.0:8443"
        "--cert ${fixtures.pki}/server.pem"
        "--key ${fixtures.pki}/server.key"
        "--client-ca ${fixtures.pki}/ca.pem"
        "--order-key ${fixtures.pki}/order-signing.key"
        "--data-dir ${dataDir}"
      ];
      StateDirectory = "mcp-server";
    };
  };
  environment.systemPackages = [
    fixtures.mcpServer
    pkgs.curl
    pkgs.jq
  ];
  environment.variables.MCP_DATA_DIR = dataDir;
}
