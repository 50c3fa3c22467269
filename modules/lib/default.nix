# The pure (builtins-only) helpers behind the NixOS modules. Each is a function
# of plain data; tests/nix/check.sh evaluates the same files without nixpkgs.
{
  serviceHardening = import ./service-hardening.nix;
  mcpServerHardening = import ./mcp-server-hardening.nix;
  egressRuleset = import ./egress-ruleset.nix;
  polkitRule = import ./polkit-rule.nix;
  auditRules = import ./audit-rules.nix;
  auditDirectories = import ./audit-directories.nix;
  baseline = import ./baseline.nix;
  peerUrl = import ./peer-url.nix;
}
