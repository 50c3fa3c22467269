# The polkit rule that is the agent's only path to privileged work.
#
# The agent's user may call systemd's manage-units action through D-Bus on
# exactly the allowlisted units: start and restart the units it heals, stop the
# units the baseline wants inactive, and start the root oneshot units
# (generation switch and rollback, ruleset export, restore test). It can never
# stop a unit it heals, so a compromised agent cannot switch off the firewall,
# auditd or sshd. Every other unit and verb is refused for that user
# (polkit.Result.NO, not NOT_HANDLED, so no later rule or prompt can grant it).
#
# Pure (builtins only), returns the JavaScript text for
# security.polkit.extraConfig; tests/nix/check.sh runs the same text under
# node against a fake polkit object.
{
  # The agent's system user.
  user,
  # Units the agent heals: start and restart.
  manageUnits ? [ ],
  # Units the baseline wants inactive: stop only.
  stopUnits ? [ ],
  # Root oneshot units the agent may start and nothing else.
  startUnits ? [ ],
  # Template prefixes ("name@") whose instances the agent may start when the
  # instance is a number (a system generation) or a store path's name
  # (<32 nixbase32 characters>-<name>), e.g. "compliance-agent-switch@".
  startTemplates ? [ ],
}:
let
  inherit (builtins)
    concatStringsSep
    filter
    map
    match
    toJSON
    ;
  unitPattern = "[A-Za-z0-9:_.@\\\\-]+\\.(service|socket|timer|target|path|mount|swap)";
  templatePattern = "[A-Za-z0-9:_.\\\\-]+@";
  badUnits = filter (u: match unitPattern u == null) (manageUnits ++ stopUnits ++ startUnits);
  badTemplates = filter (t: match templatePattern t == null) startTemplates;
  overlap = filter (u: builtins.elem u (manageUnits ++ stopUnits)) startUnits ++ filter (u: builtins.elem u manageUnits) stopUnits;
in
if match "[a-z_][a-z0-9_-]*" user == null then
  throw "polkit-rule: '${user}' is not a valid user name"
else if badUnits != [ ] then
  throw "polkit-rule: not unit names: ${toJSON badUnits}"
else if badTemplates != [ ] then
  throw "polkit-rule: template prefixes must end in '@', got: ${toJSON badTemplates}"
else if overlap != [ ] then
  throw "polkit-rule: units listed in more than one of manageUnits, stopUnits, startUnits: ${toJSON overlap}"
else
  ''
    // Compliance agent: systemd units its user may control (modules/lib/polkit-rule.nix).
    polkit.addRule(function (action, subject) {
      if (action.id !== "org.freedesktop.systemd1.manage-units" || subject.user !== ${toJSON user}) {
        return polkit.Result.NOT_HANDLED;
      }
      var manageUnits = ${toJSON manageUnits};
      var stopUnits = ${toJSON stopUnits};
      var startUnits = ${toJSON startUnits};
      var startTemplates = ${toJSON startTemplates};
      var unit = action.lookup("unit");
      var verb = action.lookup("verb");
      if (typeof unit !== "string" || typeof verb !== "string") {
        return polkit.Result.NO;
      }
      if (manageUnits.indexOf(unit) >= 0 && (verb === "start" || verb === "restart")) {
        return polkit.Result.YES;
      }
      if (stopUnits.indexOf(unit) >= 0 && verb === "stop") {
        return polkit.Result.YES;
      }
      if (verb !== "start") {
        return polkit.Result.NO;
      }
      if (startUnits.indexOf(unit) >= 0) {
        return polkit.Result.YES;
      }
      for (var i = 0; i < startTemplates.length; i++) {
        var prefix = startTemplates[i];
        if (unit.indexOf(prefix) === 0 && /^([0-9]{1,9}|[0-9a-df-np-sv-z]{32}-[A-Za-z0-9._-]{1,180})\.service$/.test(unit.substring(prefix.length))) {
          return polkit.Result.YES;
        }
      }
      return polkit.Result.NO;
    });
  ''
