{
  description = "HIPAA compliance appliance for MSPs: the compliance agent, its hardened NixOS modules, example site boxes, the installer ISO and VM tests";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    sops-nix = {
      url = "github:Mic92/sops-nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    disko = {
      url = "github:nix-community/disko";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  # Wiring only: the package is agent/package.nix, the modules are in
  # modules/, the hosts in hosts/, the checks are collected by checks/lib/.
  outputs =
    {
      self,
      nixpkgs,
      ...
    }@inputs:
    let
      inherit (nixpkgs) lib;
      eachSystem = lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ];
      pkgsFor = system: nixpkgs.legacyPackages.${system};
    in
    {
      packages = eachSystem (
        system:
        let
          pkgs = pkgsFor system;
          agent = pkgs.callPackage ./agent/package.nix { };
        in
        {
          compliance-agent = agent;
          default = agent;
          # The MSP's central server, from the same workspace.
          mcp-server = pkgs.callPackage ./agent/package.nix { cargoPackage = "mcp-server"; };
          installer-iso = self.nixosConfigurations."installer-${system}".config.system.build.isoImage;
        }
      );

      nixosModules = {
        compliance-agent =
          { pkgs, lib, ... }:
          {
            imports = [ ./modules/compliance-agent.nix ];
            services.compliance-agent.package =
              lib.mkDefault
                self.packages.${pkgs.stdenv.hostPlatform.system}.compliance-agent;
          };
        hardening = ./modules/hardening.nix;
        mcp-server =
          { pkgs, lib, ... }:
          {
            imports = [ ./modules/mcp-server.nix ];
            services.mcp-server.package =
              lib.mkDefault
                self.packages.${pkgs.stdenv.hostPlatform.system}.mcp-server;
          };
        default = {
          imports = [
            self.nixosModules.compliance-agent
            self.nixosModules.hardening
          ];
        };
      };

      nixosConfigurations = import ./hosts { inherit inputs self lib; };

      checks = eachSystem (
        system:
        import ./checks/lib {
          inherit inputs self lib system;
          pkgs = pkgsFor system;
        }
      );

      formatter = eachSystem (system: (pkgsFor system).nixfmt);
    };
}
