# Collects the flake's checks for one system:
# - every .nix file directly in checks/ is a NixOS VM test, run through
#   run-test.nix (one wrapper, one global timeout); files are found, not listed;
# - each example host's system.build.toplevel (and the installer ISO's);
# - clippy with -D warnings, and formatting (rustfmt; Nix files are formatted
#   with `nix fmt`, not checked: see docs/DECISIONS.md).
{
  inputs,
  self,
  lib,
  pkgs,
  system,
}:
let
  runTest = import ./run-test.nix { inherit inputs self pkgs; };

  testFiles = lib.filterAttrs (name: type: type == "regular" && lib.hasSuffix ".nix" name) (
    builtins.readDir ../.
  );
  vmTests = lib.mapAttrs' (
    file: _: lib.nameValuePair "vm-${lib.removeSuffix ".nix" file}" (runTest (../. + "/${file}"))
  ) testFiles;

  hosts = lib.filterAttrs (
    name: host: name != "installer" && host.pkgs.stdenv.hostPlatform.system == system
  ) self.nixosConfigurations;
  hostToplevels = lib.mapAttrs' (
    name: host: lib.nameValuePair "host-${name}" host.config.system.build.toplevel
  ) hosts;

  agent = self.packages.${system}.compliance-agent;

  clippy = agent.overrideAttrs (old: {
    pname = "compliance-agent-clippy";
    nativeBuildInputs = (old.nativeBuildInputs or [ ]) ++ [ pkgs.clippy ];
    # Replaces the build: lint every crate and target of the workspace.
    buildPhase = ''
      runHook preBuild
      cargo clippy --workspace --all-targets --offline -- -D warnings
    '';
    doCheck = false;
    installPhase = "touch $out";
  });

  formatting =
    pkgs.runCommand "formatting"
      {
        nativeBuildInputs = [
          pkgs.rustfmt
          pkgs.findutils
        ];
      }
      ''
        cd ${self}
        find . -name '*.rs' -not -path './target/*' -print0 | xargs -0 rustfmt --check --edition 2024
        touch $out
      '';
in
vmTests
// hostToplevels
// {
  inherit clippy formatting;
  package = agent;
}
