# The profile every site box shares: the agent and the hardening baseline,
# LUKS2 disk layout, sops-nix secrets, boot and administration defaults.
# A host file adds its identity, addresses and secrets file.
{
  config,
  lib,
  inputs,
  self,
  ...
}:
{
  imports = [
    self.nixosModules.compliance-agent
    self.nixosModules.hardening
    inputs.sops-nix.nixosModules.sops
    inputs.disko.nixosModules.disko
    ./disko-luks.nix
  ];

  system.stateVersion = "25.11";
  # Evidence names the flake revision the running system was built from.
  system.configurationRevision = self.rev or self.dirtyRev or null;

  boot.loader.systemd-boot.enable = true;
  boot.loader.efi.canTouchEfiVariables = true;
  # systemd in stage 1 unlocks the LUKS volume with the TPM2 enrolled at install.
  boot.initrd.systemd.enable = true;

  # Opinionated defaults a site may change (lib.mkDefault).
  time.timeZone = lib.mkDefault "UTC";
  i18n.defaultLocale = lib.mkDefault "en_US.UTF-8";
  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];
  # Keep generations for the patching check and rollbacks, but not forever.
  nix.gc = {
    automatic = lib.mkDefault true;
    dates = lib.mkDefault "weekly";
    options = lib.mkDefault "--delete-older-than 90d";
  };

  compliance.hardening = {
    enable = true;
    # The MSP's binary cache signs what the boxes may switch to.
    updates.trustedPublicKeys = [
      (lib.fileContents ./example-msp/cache-signing.pub)
    ];
  };

  services.compliance-agent = {
    enable = true;
    # Created on the box by the installer's enrolment; never leaves it.
    signingKeyFile = "/var/lib/compliance-agent-keys/signing.key";
    mcp = {
      clientKeyFile = "/var/lib/compliance-agent-keys/client.key";
      clientCertFile = config.sops.secrets."compliance-agent/client-cert".path;
      apiKeyFile = config.sops.secrets."compliance-agent/mcp-api-key".path;
      caCertFile = "${./example-msp/ca.pem}";
      orderPublicKeyFile = "${./example-msp/order-signing.pub.pem}";
    };
    baseline.backup.resticJob = "site";
  };

  # sops-nix decrypts with the box's own age key, made at enrolment.
  sops.age.keyFile = "/var/lib/sops-nix/key.txt";
  sops.age.sshKeyPaths = [ ];
  sops.gnupg.sshKeyPaths = [ ];
  sops.secrets = {
    "compliance-agent/mcp-api-key".restartUnits = [ "compliance-agent.service" ];
    "compliance-agent/client-cert".restartUnits = [ "compliance-agent.service" ];
    "restic/password".restartUnits = [ "compliance-agent.service" ];
  };

  services.restic.backups.site = {
    passwordFile = config.sops.secrets."restic/password".path;
    paths = [ "/var/lib" ];
    exclude = [ "/var/lib/compliance-agent-restore-test" ];
    initialize = true;
    timerConfig = {
      OnCalendar = "01:30";
      RandomizedDelaySec = "20m";
      Persistent = true;
    };
    pruneOpts = [
      "--keep-daily 14"
      "--keep-weekly 8"
      "--keep-monthly 72"
    ];
  };

  # Signatures come from the MSP's mirror (compliance.hardening.antivirus.mirrorUrl
  # in each host file): the egress allowlist cannot admit ClamAV's CDN.
  services.clamav = {
    daemon.enable = true;
    updater.enable = true;
  };

  users.users.msp-admin = {
    isNormalUser = true;
    extraGroups = [ "wheel" ];
    # MSP administrators' public keys; replace with your own.
    openssh.authorizedKeys.keyFiles = [ ./example-msp/admin-keys.pub ];
  };
  security.sudo.wheelNeedsPassword = false;
}
