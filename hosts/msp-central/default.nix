# Example central host: the MSP's mcp-server with PostgreSQL and a locally
# locked MinIO bucket as the evidence archive. Addresses are documentation
# ranges (RFC 5737). Secrets are files the MSP provisions on the machine (for
# example with sops-nix, as the site boxes do); they never enter the Nix store.
{ self, ... }:
let
  secrets = "/var/lib/mcp-secrets";
in
{
  imports = [ self.nixosModules.mcp-server ];

  networking.hostName = "msp-central";
  system.stateVersion = "25.11";
  boot.loader.systemd-boot.enable = true;
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };

  services.mcp-server = {
    enable = true;
    database = "postgresql";
    archive.backend = "minio";
    archive.s3.secretAccessKeyFile = "${secrets}/s3-secret";
    archive.minio.rootCredentialsFile = "${secrets}/minio-root";
    orderKeyFile = "${secrets}/order-signing.key";
    # The boxes' sites reach it over the MSP's VPN; operators over SSH (loopback).
    allowedAddresses = [ "198.51.100.0/24" ];
    openFirewall = true;
    settings = {
      server_names = [
        "mcp.example-msp.example"
        "203.0.113.50"
      ];
      public_url = "https://mcp.example-msp.example:8443";
    };
  };

}
