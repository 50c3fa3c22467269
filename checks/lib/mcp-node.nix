# The `mcp` node: the central server (nixosModules.mcp-server, SQLite and the
# local archive) over mTLS on 8443 with the fixture PKI: its server certificate,
# client certificates of the fixture CA, orders signed with the fixture order key
# (which the agent nodes pin). Boxes are provisioned by hand with
# `mcp-server-admin hosts add SITE/HOST --pubkey PEM`; orders are
# `mcp-server-admin order create`. The central guardrails a test would trip over
# when it orders the same runbook twice in a row are defaults it may change.
{
  lib,
  pkgs,
  fixtures,
  ...
}:
{
  imports = [ ../../modules/mcp-server.nix ];

  services.mcp-server = {
    enable = true;
    package = fixtures.mcpServer;
    openFirewall = true;
    allowedAddresses = [ "192.168.1.0/24" ];
    tls.certFile = "${fixtures.pki}/server.pem";
    tls.keyFile = "${fixtures.pki}/server.key";
    clientCaFile = "${fixtures.pki}/ca.pem";
    orderKeyFile = "${fixtures.pki}/order-signing.key";
    settings = {
      server_names = lib.mkDefault [ "mcp" ];
      orders = {
        # Tests order restart_unit back to back and have no second operator.
        cooldown_sec = lib.mkDefault 0;
        disruptive_runbooks = lib.mkDefault [ ];
        default_site_allowlist = lib.mkDefault [
          "collect_evidence"
          "restart_unit"
        ];
      };
    };
  };

  environment.systemPackages = [
    pkgs.curl
    pkgs.jq
  ];
}
