# The installer ISO for new sites. Boots to a console with `compliance-install`,
# which partitions the box with the chosen host's disko layout (LUKS2),
# installs that host's system from the closure carried on the ISO (no network
# needed) and enrols it: the evidence signing key, the mTLS client key and CSR,
# and the box's age key for sops, with the public halves printed for the MSP.
{
  config,
  lib,
  pkgs,
  modulesPath,
  self,
  ...
}:
let
  system = pkgs.stdenv.hostPlatform.system;
  # The site boxes this ISO can install: those built for its architecture.
  installable = lib.filterAttrs (
    name: host: !(lib.hasPrefix "installer" name) && host.pkgs.stdenv.hostPlatform.system == system
  ) self.nixosConfigurations;

  hostTable = pkgs.writeText "installable-hosts" (
    lib.concatStrings (
      lib.mapAttrsToList (
        name: host:
        "${name} ${host.config.system.build.toplevel} ${host.config.system.build.diskoScript} ${host.config.services.compliance-agent.siteId}\n"
      ) installable
    )
  );

  agent = self.packages.${system}.compliance-agent;

  install = pkgs.writeShellApplication {
    name = "compliance-install";
    runtimeInputs = [
      agent
      pkgs.age
      pkgs.coreutils
      pkgs.cryptsetup
      pkgs.gawk
      pkgs.nixos-install-tools
      pkgs.openssl
      pkgs.systemd
      pkgs.util-linux
    ];
    text = ''
      hosts=${hostTable}
      usage() {
        echo "usage: compliance-install HOST" >&2
        echo "HOST is one of:" >&2
        awk '{ print "  " $1 " (site " $4 ")" }' "$hosts" >&2
        exit 2
      }
      [ $# -eq 1 ] || usage
      line="$(awk -v h="$1" '$1 == h' "$hosts")"
      [ -n "$line" ] || usage
      read -r host toplevel disko site <<<"$line"

      echo "This ERASES the disk configured for $host (compliance.disk.device) and installs it."
      read -r -p "Type the host name to continue: " answer
      [ "$answer" = "$host" ] || { echo "aborted"; exit 1; }

      # The LUKS passphrase: the recovery secret kept by the MSP; the TPM2
      # (if present) unlocks at boot.
      umask 077
      while :; do
        read -r -s -p "LUKS recovery passphrase (20+ characters): " pass; echo
        read -r -s -p "Again: " again; echo
        if [ "$pass" = "$again" ] && [ "''${#pass}" -ge 20 ]; then break; fi
        echo "passphrases differ or are too short"
      done
      printf '%s' "$pass" > /tmp/disk.key
      unset pass again

      "$disko"

      nixos-install --no-root-passwd --no-channel-copy --root /mnt --system "$toplevel"

      device="$(cryptsetup status cryptroot | awk '$1 == "device:" { print $2 }')"
      if [ -e /dev/tpmrm0 ]; then
        PASSWORD="$(cat /tmp/disk.key)" systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=7 "$device"
        echo "TPM2 enrolled: the box unlocks at boot without the passphrase."
      else
        echo "No TPM2 found: the passphrase is needed at every boot."
      fi
      shred -u /tmp/disk.key

      keys=/mnt/var/lib/compliance-agent-keys
      install -d -m 0700 "$keys" /mnt/var/lib/sops-nix
      compliance-agent keygen --out "$keys"
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$keys/client.key" -out "$keys/client.csr" \
        -subj "/O=$site/CN=$host"
      chmod 0600 "$keys/client.key"
      age-keygen -o /mnt/var/lib/sops-nix/key.txt 2>/dev/null
      chmod 0600 /mnt/var/lib/sops-nix/key.txt

      {
        echo "== Enrolment of $host (site $site)"
        echo "-- evidence signing public key (register at the MCP):"
        cat "$keys/signing.pub.pem"
        echo "-- client certificate request (sign with the MSP's MCP CA; the certificate goes into sops/secrets/$host.yaml as compliance-agent/client-cert):"
        cat "$keys/client.csr"
        echo "-- age recipient for sops (add to sops/.sops.yaml, then run sops updatekeys):"
        age-keygen -y /mnt/var/lib/sops-nix/key.txt
      } | tee "$keys/enrolment.txt"
      echo "Saved to /var/lib/compliance-agent-keys/enrolment.txt on the installed system. Reboot when the MSP has the above."
    '';
  };
in
{
  imports = [ "${modulesPath}/installer/cd-dvd/installation-cd-minimal.nix" ];

  system.stateVersion = "25.11";
  # Everything the installation needs is on the ISO: a site may have no
  # network yet, and the box must not fetch from anywhere but the MSP.
  isoImage.storeContents = lib.mapAttrsToList (_: host: host.config.system.build.toplevel) installable;

  environment.systemPackages = [
    install
    agent
    pkgs.age
    pkgs.sops
  ];
  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];

  services.getty.helpLine = lib.mkForce ''

    Compliance appliance installer. Run:  sudo compliance-install HOST
    (without arguments it lists the hosts this ISO carries).
  '';
}
