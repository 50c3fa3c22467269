# The site box every VM test starts from: the agent and the hardening module
# as on a real box, minus what a VM cannot have (LUKS disks). Keys are made
# at first boot by a test-only enrolment unit, as the installer would.
{
  config,
  lib,
  pkgs,
  nodes,
  fixtures,
  ...
}:
let
  mcpAddress = if nodes ? mcp then nodes.mcp.networking.primaryIPAddress else null;
  keys = "/var/lib/compliance-agent-keys";
in
{
  compliance.hardening = {
    enable = true;
    # Test VMs hold no data and have no LUKS disks.
    encryption.enable = false;
    timeSync.servers = [ (if mcpAddress != null then mcpAddress else "192.168.1.254") ];
  };

  services.compliance-agent = {
    enable = true;
    siteId = lib.mkDefault "test-site";
    hostId = lib.mkDefault "machine";
    deploymentMode = "direct";
    policyVersion = "vm-test";
    logLevel = "DEBUG";
    maintenanceWindow = lib.mkDefault "00:00-23:59";
    signingKeyFile = "${keys}/signing.key";
    mcp = lib.mkIf (mcpAddress != null) {
      url = "https://mcp:8443";
      addresses = [ mcpAddress ];
      port = 8443;
      pollIntervalSec = 10;
      # The fixture PKI; a test that enrolls by token points these at what
      # `compliance-agent enroll` writes.
      caCertFile = lib.mkDefault "${fixtures.pki}/ca.pem";
      clientCertFile = lib.mkDefault "${fixtures.pki}/client.pem";
      clientKeyFile = lib.mkDefault "${keys}/client.key";
      orderPublicKeyFile = lib.mkDefault "${fixtures.pki}/order-signing.pub.pem";
    };
    # A stand-in for a clinic application the agent keeps running.
    serviceHealthChecks = [ "clinic-app.service" ];
  };

  systemd.services.clinic-app = {
    description = "Stand-in clinic application";
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
      DynamicUser = true;
    };
  };

  # What the installer's enrolment does on a real box.
  systemd.services.compliance-agent-test-enrol = {
    description = "Test-only enrolment: signing key and client key";
    wantedBy = [ "multi-user.target" ];
    before = [ "compliance-agent.service" ];
    requiredBy = [ "compliance-agent.service" ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    script = ''
      install -d -m 0700 ${keys}
      if [ ! -e ${keys}/signing.key ]; then
        ${lib.getExe config.services.compliance-agent.package} keygen --out ${keys}
      fi
      install -m 0600 ${fixtures.pki}/client.key ${keys}/client.key
    '';
  };

  environment.systemPackages = [
    pkgs.jq
    pkgs.curl
  ];
  # A default only: a test that needs more memory sets its own value.
  virtualisation.memorySize = lib.mkDefault 1536;
}
