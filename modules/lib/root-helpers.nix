# The scripts of the root oneshot units that do what the unprivileged agent
# may not: change the running generation, and export the nftables rulesets.
# Pure (builtins only): returns the script texts; modules/compliance-agent.nix
# wraps them with pkgs.writeShellScript, and the appliance harness installs the
# same texts.
#
# switch INSTANCE: INSTANCE is a generation number of the system profile, or
# the name of a system store path that is already in the store and carries a
# signature from a key in the box's trusted-public-keys (it becomes a new
# generation). rollback: the profile's previous generation. nftExport: the
# live ruleset as `nft --json` lists it, and the baseline ruleset file loaded
# into a throwaway network namespace and listed the same way, both written
# atomically and world-readable for the agent to compare. auditExport: the
# audit rules in force and whether they are locked, likewise.
{
  # The system profile, e.g. /nix/var/nix/profiles/system.
  systemProfile,
  # Where nftExport writes the live ruleset (JSON).
  rulesetExportFile ? "/run/compliance-agent-export/ruleset.json",
  # Where nftExport writes the baseline ruleset as loaded (JSON).
  expectedExportFile ? "/run/compliance-agent-export/expected.json",
  # The baseline ruleset file (nft syntax), or null.
  rulesetFile ? null,
  # Where auditExport writes the audit rules in force (`auditctl -l`), after
  # a "# enabled N" line with the kernel's audit state (2: locked).
  auditExportFile ? "/run/compliance-agent-export/audit-rules.txt",
}:
let
  exportTo = file: command: ''
    tmp="$(mktemp ${dirOf file}/.export.XXXXXX)"
    ${command} > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" ${file}
  '';
in
if builtins.match "/[A-Za-z0-9/._-]+" systemProfile == null then
  throw "root-helpers: '${systemProfile}' is not an absolute profile path"
else if
  builtins.any (f: f != null && builtins.match "/[A-Za-z0-9/._+-]+" f == null) [
    rulesetExportFile
    expectedExportFile
    rulesetFile
    auditExportFile
  ]
then
  throw "root-helpers: export and ruleset files must be absolute paths without spaces or quotes"
else
  {
    switch = ''
      set -euo pipefail
      instance="''${1:-}"
      case "$instance" in
        "") echo "no generation or store path given" >&2; exit 2 ;;
        *[!0-9]*)
          case "$instance" in
            */* | .*) echo "'$instance' is not a store path name" >&2; exit 2 ;;
          esac
          path="/nix/store/$instance"
          nix-store --check-validity "$path"
          nix --extra-experimental-features nix-command store verify --no-contents --sigs-needed 1 "$path"
          if [ ! -x "$path/bin/switch-to-configuration" ]; then
            echo "$path is not a NixOS system" >&2
            exit 1
          fi
          nix-env --profile ${systemProfile} --set "$path"
          exec "$path/bin/switch-to-configuration" switch
          ;;
      esac
      link="${systemProfile}-$instance-link"
      if [ ! -x "$link/bin/switch-to-configuration" ]; then
        echo "generation $instance of ${systemProfile} does not exist" >&2
        exit 1
      fi
      nix-env --profile ${systemProfile} --switch-generation "$instance"
      exec "$link/bin/switch-to-configuration" switch
    '';
    rollback = ''
      set -euo pipefail
      nix-env --profile ${systemProfile} --rollback
      exec ${systemProfile}/bin/switch-to-configuration switch
    '';
    nftExport =
      "set -euo pipefail\n"
      + exportTo rulesetExportFile "nft --json list ruleset"
      + (
        if rulesetFile == null then
          ""
        else
          exportTo expectedExportFile "unshare --net -- sh -c 'nft -f \"$1\" && nft --json list ruleset' sh ${rulesetFile}"
      );
    # The agent has no CAP_AUDIT_CONTROL to list the rules itself.
    auditExport =
      "set -euo pipefail\n"
      + exportTo auditExportFile "{ auditctl -s | sed -n 's/^enabled /# enabled /p'; auditctl -l; }";
  }
