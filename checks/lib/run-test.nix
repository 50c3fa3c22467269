# The one wrapper every VM test in checks/ runs through: the same global
# timeout, the flake's modules and test defaults on every node, and `self`
# plus the shared test fixtures as module arguments.
{
  inputs,
  self,
  pkgs,
}:
testFile:
pkgs.testers.runNixOSTest {
  imports = [ testFile ];
  # A hung VM fails the check instead of holding the builder.
  globalTimeout = 20 * 60;
  node.specialArgs = {
    inherit inputs self;
    fixtures = import ./fixtures.nix { inherit pkgs self; };
  };
  _module.args = {
    inherit self;
    fixtures = import ./fixtures.nix { inherit pkgs self; };
  };
  defaults = {
    imports = [
      self.nixosModules.compliance-agent
      self.nixosModules.hardening
    ];
  };
}
