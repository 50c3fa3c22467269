# Example site box in direct mode: the server of clinic B, managed by the MSP
# itself. Addresses are documentation ranges (RFC 5737); replace them.
{ ... }:
{
  networking.hostName = "clinic-b-server";
  compliance.disk.device = "/dev/disk/by-id/example-clinic-b-server-disk";

  services.compliance-agent = {
    siteId = "clinic-b";
    deploymentMode = "direct";
    policyVersion = "2026.11";
    mcp = {
      url = "https://mcp.example-msp.example";
      addresses = [ "203.0.113.50" ];
    };
    # Nothing but the appliance runs here: no telnet or FTP listeners, ever.
    baseline.inactiveUnits = [
      "telnet.socket"
      "vsftpd.service"
    ];
  };
  networking.hosts."203.0.113.50" = [ "mcp.example-msp.example" ];

  compliance.hardening = {
    # The MSP's update host: its binary cache and its ClamAV signature mirror.
    updates.substituterUrl = "https://198.51.100.30";
    antivirus.mirrorUrl = "http://198.51.100.30:8080";
    timeSync.servers = [ "192.0.2.123" ];
    firewall.egress = {
      backup = {
        addresses = [ "198.51.100.40" ];
        ports = [ 8000 ];
      };
    };
  };

  services.restic.backups.site.repository = "rest:http://198.51.100.40:8000/clinic-b-server";
  sops.defaultSopsFile = ../../sops/secrets/clinic-b-server.yaml;
}
