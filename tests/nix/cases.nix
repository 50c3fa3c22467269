# Test inputs for the pure functions in modules/lib/, evaluated by
# tests/nix/check.sh with `nix-instantiate --eval --strict --json`.
# The addresses are those of the network namespaces check.sh creates.
let
  lib = import ../../modules/lib;
  hardening = lib.serviceHardening {
    allowedAddresses = [ "10.231.1.2" ];
    readWritePaths = [ "/var/lib/compliance-agent-metrics" ];
  };
  egress = {
    mcp = {
      addresses = [ "10.231.1.2" ];
      ports = [ 8443 ];
    };
    ntp = {
      addresses = [ "10.231.1.3" ];
      proto = "udp";
      ports = [ 123 ];
    };
    update-cache = {
      addresses = [ "fd31:231::10" ];
      ports = [ 443 ];
    };
  };
  auditRules = lib.auditRules {
    arches = [
      "b64"
      "b32"
    ];
    secretFiles = [
      "/var/lib/compliance-agent-keys/signing.key"
      # Under /run: not watched (re-pointed at every activation).
      "/run/secrets/compliance-agent/mcp-api-key"
    ];
  };
  auditExtraRules = [ "-w /var/lib/clinic-data/records -p wa -k phi-data" ];
in
{
  hardening = hardening;
  unit = import ./render-unit.nix { serviceConfig = hardening; };
  # Negative control: a unit with only a user set must fail the exposure limit.
  unitUnhardened = import ./render-unit.nix { serviceConfig = { User = "compliance-agent"; }; };
  # The central server's unit, as modules/mcp-server.nix builds it for a box network.
  mcpServerUnit = import ./render-unit.nix {
    serviceConfig = lib.mcpServerHardening { allowedAddresses = [ "10.231.0.0/16" ]; };
    description = "MSP central server (offline rendering)";
    execArgs = "--config /etc/mcp-server/config.toml serve";
    type = "simple";
  };

  ruleset = lib.egressRuleset {
    inherit egress;
    inboundTcpPorts = [ 22 ];
  };

  polkit = lib.polkitRule {
    user = "compliance-agent";
    manageUnits = [
      "sshd.service"
      "chronyd.service"
      "nftables.service"
    ];
    stopUnits = [ "telnet.socket" ];
    startUnits = [
      "compliance-agent-rollback.service"
      "compliance-agent-nft-export.service"
    ];
    startTemplates = [ "compliance-agent-switch@" ];
  };

  audit = auditRules;
  # What modules/hardening.nix passes: the rules plus a site's extra watch.
  auditDirectories = lib.auditDirectories {
    rules = auditRules ++ auditExtraRules;
    owners = {
      "/var/lib/compliance-agent" = "0750 compliance-agent compliance-agent";
      "/var/lib/compliance-agent-keys" = "0700 root root";
    };
  };
  auditAllRules = auditRules ++ auditExtraRules;

  baseline = lib.baseline {
    policyVersion = "2026.11-test";
    units = [
      {
        name = "sshd.service";
        active = true;
        enabled = true;
      }
      {
        name = "restic-backups-site.timer";
        active = true;
        enabled = true;
      }
    ];
    patching = {
      system_profile = "/nix/var/nix/profiles/system";
      target_system = null;
      target_revision = null;
      max_generation_age_days = 45;
    };
    logging = {
      journald_persistent = true;
      journald_max_retention_sec = 31536000;
      auditd = true;
      audit_rules = [ "-w /etc/passwd -p wa -k identity" ];
      audit_rules_export_file = "/run/compliance-agent-export/audit-rules.txt";
      audit_rules_export_unit = "compliance-agent-audit-export.service";
    };
    firewall = {
      unit = "nftables.service";
      ruleset_file = "/nix/store/00000000000000000000000000000000-compliance-nftables-rules";
      egress_policy = "drop";
      ruleset_export_unit = "compliance-agent-nft-export.service";
      ruleset_export_file = "/run/compliance-agent-export/ruleset.json";
      expected_export_file = "/run/compliance-agent-export/expected.json";
    };
    timeSync = {
      unit = "chronyd.service";
      servers = [ "10.231.1.3" ];
      max_offset_ms = 5000;
      max_stratum = 4;
    };
  };

  # Peers named by URL (the AV mirror, the binary cache) as the allowlist sees them.
  peerUrls = map lib.peerUrl [
    "http://198.51.100.30:8080/clamav"
    "https://198.51.100.30"
    "http://[fd31:231::10]:8443/"
  ];

  # Each of these must make evaluation fail with a message (negative tests).
  invalid = {
    peerUrlHostName = lib.peerUrl "http://database.clamav.net";
    peerUrlOctet = lib.peerUrl "http://300.1.1.1";
    peerUrlPort = lib.peerUrl "https://198.51.100.30:70000";
    peerUrlScheme = lib.peerUrl "ftp://198.51.100.30";
    egressNoPorts = lib.egressRuleset { egress.mcp.addresses = [ "10.231.1.2" ]; };
    egressHostName = lib.egressRuleset {
      egress.mcp = {
        addresses = [ "mcp.example.org" ];
        ports = [ 443 ];
      };
    };
    egressInjection = lib.egressRuleset {
      egress.mcp = {
        addresses = [ "10.0.0.1 accept; #" ];
        ports = [ 443 ];
      };
    };
    egressBadPort = lib.egressRuleset {
      egress.mcp = {
        addresses = [ "10.231.1.2" ];
        ports = [ 70000 ];
      };
    };
    hardeningHostName = lib.serviceHardening { allowedAddresses = [ "mcp.example.org" ]; };
    hardeningRelativePath = lib.serviceHardening { readWritePaths = [ "var/lib/x" ]; };
    polkitBadUnit = lib.polkitRule {
      user = "compliance-agent";
      manageUnits = [ "sshd\"); polkit.Result.YES; (\"" ];
    };
    polkitOverlap = lib.polkitRule {
      user = "compliance-agent";
      manageUnits = [ "sshd.service" ];
      stopUnits = [ "sshd.service" ];
    };
    polkitTemplateNoAt = lib.polkitRule {
      user = "compliance-agent";
      startTemplates = [ "compliance-agent-switch" ];
    };
    auditRelativePath = lib.auditRules { secretFiles = [ "signing.key" ]; };
    auditBadArch = lib.auditRules { arches = [ "x86" ]; };
    # Watch lists of /run/wrappers paths are gone; passing one is an error.
    auditPrivilegedPrograms = lib.auditRules { privilegedPrograms = [ "/run/wrappers/bin/sudo" ]; };
    auditDirectoriesRelative = lib.auditDirectories { rules = [ "-w relative/path -p wa -k x" ]; };
    baselineWrongType = lib.baseline {
      policyVersion = "1";
      timeSync = {
        unit = "chronyd.service";
        servers = [ ];
        max_offset_ms = "5000";
        max_stratum = 4;
      };
    };
    baselineUnknownKey = lib.baseline {
      policyVersion = "1";
      timeSync = {
        unit = "chronyd.service";
        servers = [ ];
        max_offset_ms = 5000;
        max_stratum = 4;
        peers = [ ];
      };
    };
  };
}
