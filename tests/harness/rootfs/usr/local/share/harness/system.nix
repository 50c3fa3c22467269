# A small stand-in for a NixOS system toplevel, built with /bin/sh and the
# container's coreutils (no nixpkgs): nixos-version, configuration-revision and a
# bin/switch-to-configuration that, like NixOS's, points /run/current-system at
# the configuration it belongs to.
{ name, revision ? "", version ? "25.05.harness" }:
derivation {
  name = "nixos-system-appliance-${name}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  inherit revision version;
  harnessName = name;
  args = [ "-c" ''
    set -e
    PATH=/usr/bin:/bin
    mkdir -p "$out/bin" "$out/etc" "$out/sw/bin"
    printf '%s' "$version" > "$out/nixos-version"
    printf '%s' "$revision" > "$out/configuration-revision"
    printf '%s\n' "$harnessName" > "$out/etc/harness-system-name"
    cat > "$out/bin/switch-to-configuration" <<SWITCH
    #!/bin/sh
    # Usage: switch-to-configuration switch|boot|test|dry-activate
    set -e
    case "\$1" in
      switch|test) ln -sfn "$out" /run/current-system ;;
      boot|dry-activate) ;;
      *) echo "usage: \$0 switch|boot|test|dry-activate" >&2; exit 1 ;;
    esac
    SWITCH
    chmod 0555 "$out/bin/switch-to-configuration"
  '' ];
}
