# Nix build of the Rust workspace (the flake's packages.<system>.compliance-agent
# and mcp-server, the central server). Built from Cargo.lock, with the source reduced to what cargo
# reads, so edits to Nix files or docs do not rebuild the agent.
{
  lib,
  rustPlatform,
  rustc,
  # The workspace member to build (-p).
  cargoPackage ? "compliance-agent",
}:
let
  workspace = lib.importTOML ../Cargo.toml;
  memberToml =
    if cargoPackage == "compliance-agent" then ../agent/Cargo.toml else ../mcp-server/Cargo.toml;
  member = lib.importTOML memberToml;
  # `version.workspace = true` in the member means the workspace's version.
  version =
    if builtins.isString (member.package.version or null) then
      member.package.version
    else
      workspace.workspace.package.version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      (lib.fileset.difference ../agent ./package.nix)
      # The agent's channel tests use the server as a library (a dev-dependency), so
      # the workspace needs both members to resolve.
      ../mcp-server
    ];
  };
in
assert lib.assertMsg (lib.versionAtLeast rustc.version "1.89")
  "compliance-agent needs rustc >= 1.89 (edition 2024, std::fs::File::lock); this nixpkgs has ${rustc.version}";
rustPlatform.buildRustPackage {
  pname = cargoPackage;
  inherit version src;

  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [
    "-p"
    cargoPackage
  ];
  # Unit tests only: the integration tests need root, network namespaces and
  # Debian tools (tests/run), which the build sandbox does not have.
  cargoTestFlags = [
    "-p"
    cargoPackage
    "--lib"
  ];

  meta = {
    description =
      if cargoPackage == "compliance-agent" then
        "HIPAA compliance agent: drift detection, healing and signed evidence for NixOS site boxes"
      else
        "The MSP's central server for compliance appliances: enrollment, evidence intake, WORM archive, orders";
    license = lib.licenses.agpl3Plus;
    mainProgram = cargoPackage;
    platforms = lib.platforms.linux;
  };
}
