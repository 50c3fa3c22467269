# Renders a serviceConfig attribute set into a unit file the way NixOS does
# (lists become repeated lines, booleans true/false), so tests/nix/check.sh can
# score the exact settings of modules/lib/service-hardening.nix offline.
{
  serviceConfig,
  description ? "Compliance agent (offline rendering)",
  execStart ? "/usr/bin/true",
  execArgs ? "run --config /etc/compliance-agent/config.toml",
  type ? "notify",
}:
let
  render =
    value:
    if builtins.isBool value then
      (if value then "true" else "false")
    else if builtins.isInt value then
      toString value
    else
      value;
  line = name: value: "${name}=${render value}\n";
  entry =
    name:
    let
      value = serviceConfig.${name};
    in
    if builtins.isList value then
      (if value == [ ] then "" else builtins.concatStringsSep "" (map (line name) value))
    else
      line name value;
in
''
  [Unit]
  Description=${description}

  [Service]
  Type=${type}
  NotifyAccess=main
  WatchdogSec=60s
  ExecStart=${execStart} ${execArgs}
''
+ builtins.concatStringsSep "" (map entry (builtins.attrNames serviceConfig))
+ ''

  [Install]
  WantedBy=multi-user.target
''
