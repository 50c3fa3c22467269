# The `mcp` node: the workspace's reference MCP server over mTLS on 8443,
# trusting only the test CA, signing orders with the test order key.
# The server's own CLI (tests/mcp-server): init, enroll, serve, order, list.
# Its state starts with the fixture order key, which the agent nodes pin.
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
    preStart = ''
      if [ ! -e ${dataDir}/order-signing.key ]; then
        install -m 0600 ${fixtures.pki}/order-signing.key ${dataDir}/order-signing.key
        install -m 0644 ${fixtures.pki}/order-signing.pub.pem ${dataDir}/order-signing.pub.pem
      fi
      ${fixtures.mcpServer}/bin/mcp-server init --state ${dataDir}
    '';
    serviceConfig = {
      ExecStart = lib.concatStringsSep " " [
        "${fixtures.mcpServer}/bin/mcp-server serve"
        "--state ${dataDir}"
        "--listen 0.0.0.0:8443"
        "--cert ${fixtures.pki}/server.pem"
        "--key ${fixtures.pki}/server.key"
        "--client-ca ${fixtures.pki}/ca.pem"
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
