# nixosConfigurations: the example site boxes and the installer ISO.
# Each site box is the shared profile (common/profile.nix) plus its own file.
{
  inputs,
  self,
  lib,
}:
let
  specialArgs = { inherit inputs self; };

  siteBox =
    hostModule:
    lib.nixosSystem {
      inherit specialArgs;
      modules = [
        { nixpkgs.hostPlatform = "x86_64-linux"; }
        ./common/profile.nix
        hostModule
      ];
    };

  installerFor =
    system:
    lib.nixosSystem {
      inherit specialArgs;
      modules = [
        { nixpkgs.hostPlatform = system; }
        ./installer
      ];
    };
in
{
  # Reseller mode: a clinic managed by a reseller MSP.
  clinic-a-frontdesk = siteBox ./clinic-a-frontdesk;
  # Direct mode: a clinic the MSP manages itself.
  clinic-b-server = siteBox ./clinic-b-server;

  # The MSP's central server (mcp-server with PostgreSQL and a locked MinIO bucket).
  msp-central = lib.nixosSystem {
    inherit specialArgs;
    modules = [
      { nixpkgs.hostPlatform = "x86_64-linux"; }
      ./msp-central
    ];
  };

  installer = installerFor "x86_64-linux";
  installer-x86_64-linux = installerFor "x86_64-linux";
  installer-aarch64-linux = installerFor "aarch64-linux";
}
