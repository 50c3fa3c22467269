# Example site box in reseller mode: the front-desk server of clinic A, which a
# reseller MSP manages on the clinic's behalf. Addresses are documentation
# ranges (RFC 5737); replace them with the site's.
{ ... }:
{
  networking.hostName = "clinic-a-frontdesk";
  compliance.disk.device = "/dev/disk/by-id/example-clinic-a-frontdesk-disk";

  services.compliance-agent = {
    siteId = "clinic-a";
    deploymentMode = "reseller";
    resellerId = "reseller-northwind";
    policyVersion = "2026.11";
    maintenanceWindow = "22:00-04:00";
    timezone = "America/Chicago";
    evidenceRetentionDays = 2190;
    mcp = {
      url = "https://mcp.northwind-msp.example:8443";
      addresses = [ "203.0.113.10" ];
      port = 8443;
    };
    serviceHealthChecks = [ "postgresql.service" ];
  };

  # The MCP's name resolves locally, so the box needs no DNS egress for it.
  networking.hosts."203.0.113.10" = [ "mcp.northwind-msp.example" ];

  compliance.hardening = {
    # The MSP's update host: its binary cache and its ClamAV signature mirror.
    updates.substituterUrl = "https://198.51.100.30";
    antivirus.mirrorUrl = "http://198.51.100.30:8080";
    timeSync.servers = [
      "192.0.2.123"
      "192.0.2.124"
    ];
    firewall = {
      dnsServers = [ "192.0.2.53" ];
      egress = {
        backup = {
          addresses = [ "198.51.100.20" ];
          ports = [ 443 ];
        };
      };
    };
  };

  services.restic.backups.site.repository = "rest:https://198.51.100.20/clinic-a-frontdesk";
  sops.defaultSopsFile = ../../sops/secrets/clinic-a-frontdesk.yaml;

  # The clinic's practice-management database: on the LUKS volume, backed up,
  # and on the agent's health-check list.
  services.postgresql.enable = true;
}
