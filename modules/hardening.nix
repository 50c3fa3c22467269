# NixOS module: the appliance's HIPAA baseline. nftables with an egress
# allowlist, auditd rules, chrony with an offset alarm, persistent journald,
# hardened SSH and the LUKS requirement for data volumes. Each piece has its
# own enable switch; all are on once compliance.hardening.enable is set.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.compliance.hardening;
  agent = config.services.compliance-agent or { };
  agentEnabled = agent.enable or false;

  # The pure functions tests/nix/check.sh evaluates and checks offline.
  egressRuleset = import ./lib/egress-ruleset.nix;
  auditRules = import ./lib/audit-rules.nix;
  auditDirectories = import ./lib/audit-directories.nix;
  peerUrl = import ./lib/peer-url.nix;

  # Peers named by URL, reduced to what the allowlist matches (address, port).
  avMirror = if cfg.antivirus.mirrorUrl == null then null else peerUrl cfg.antivirus.mirrorUrl;
  updateCache =
    if cfg.updates.substituterUrl == null then null else peerUrl cfg.updates.substituterUrl;

  isIP = s: builtins.match "([0-9]{1,3}\\.){3}[0-9]{1,3}|[0-9A-Fa-f]*:[0-9A-Fa-f:.]*" s != null;

  egressEntry = lib.types.submodule {
    options = {
      addresses = lib.mkOption {
        type = lib.types.nonEmptyListOf lib.types.str;
        description = "IPv4/IPv6 addresses or CIDR prefixes of the peer.";
        example = [ "198.51.100.20" ];
      };
      proto = lib.mkOption {
        type = lib.types.enum [
          "tcp"
          "udp"
        ];
        default = "tcp";
        description = "Transport protocol.";
      };
      ports = lib.mkOption {
        type = lib.types.nonEmptyListOf lib.types.port;
        description = "Destination ports.";
        example = [ 443 ];
      };
    };
  };

  rulesetText = egressRuleset {
    egress = cfg.firewall.egress;
    inboundTcpPorts = lib.unique config.networking.firewall.allowedTCPPorts;
    inboundUdpPorts = lib.unique config.networking.firewall.allowedUDPPorts;
    inherit (cfg.firewall) allowDhcp allowPing;
  };
  rulesetFile = pkgs.writeText "compliance-nftables-rules" rulesetText;

  agentSecretFiles = lib.optionals agentEnabled (
    lib.filter (f: f != null && lib.hasPrefix "/" f && !(lib.hasPrefix "%" f)) [
      agent.signingKeyFile
      agent.mcp.clientKeyFile
      agent.mcp.apiKeyFile
    ]
  );

  auditRuleLines =
    auditRules {
      stateDir = agent.stateDir or "/var/lib/compliance-agent";
      evidenceDir = agent.evidenceDir or "/var/lib/compliance-agent/evidence";
      secretFiles = agentSecretFiles;
      arches =
        if pkgs.stdenv.hostPlatform.isx86_64 then
          [
            "b64"
            "b32"
          ]
        else
          [ "b64" ];
    }
    ++ cfg.audit.extraRules;

  offsetLimitSeconds = "${toString (cfg.timeSync.maxOffsetMs / 1000)}.${
    lib.fixedWidthString 3 "0" (toString (lib.mod cfg.timeSync.maxOffsetMs 1000))
  }";
  offsetCheck = pkgs.writeShellScript "compliance-time-offset-check" ''
    set -euo pipefail
    tracking="$(chronyc -c tracking)"
    stratum="$(echo "$tracking" | cut -d, -f3)"
    offset="$(echo "$tracking" | cut -d, -f5)"
    if awk -v o="$offset" -v m="${offsetLimitSeconds}" 'BEGIN { if (o < 0) o = -o; exit !(o > m) }'; then
      echo "<3>clock offset ''${offset}s exceeds the limit of ${offsetLimitSeconds}s (stratum $stratum)"
      exit 1
    fi
    echo "clock offset ''${offset}s within ${offsetLimitSeconds}s (stratum $stratum)"
  '';

  luksNames = lib.attrNames config.boot.initrd.luks.devices;
  onLuks = device: lib.any (name: device == "/dev/mapper/${name}") luksNames;
  unencryptedMounts = lib.filter (
    mount: config.fileSystems ? ${mount} && !(onLuks (config.fileSystems.${mount}.device or ""))
  ) cfg.encryption.mountPoints;
in
{
  options.compliance.hardening = {
    enable = lib.mkEnableOption "the appliance's HIPAA hardening baseline (firewall, audit, time, journald, SSH, LUKS)";

    firewall = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Replace the NixOS firewall with the appliance ruleset: default drop
          both ways, egress only to `egress`, inbound only to the ports in
          networking.firewall.allowedTCPPorts/allowedUDPPorts, drops logged.
        '';
      };
      egress = lib.mkOption {
        type = lib.types.attrsOf egressEntry;
        default = { };
        description = ''
          Egress allowlist. `mcp` (from services.compliance-agent.mcp), `ntp`
          (from timeSync.servers), `dns` (from dnsServers), `av-mirror` (from
          antivirus.mirrorUrl) and `update-cache` (from updates.substituterUrl)
          are filled in; add `backup` for the backup target.
        '';
        example = lib.literalExpression ''
          {
            backup = { addresses = [ "198.51.100.20" ]; ports = [ 443 ]; };
          }
        '';
      };
      dnsServers = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "Resolvers the box may query (UDP and TCP 53); they become networking.nameservers, and resolvers from DHCP are ignored (the firewall would drop them). Empty: no DNS; name the MCP in networking.hosts.";
        example = [ "192.0.2.53" ];
      };
      allowDhcp = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Allow DHCPv4 client traffic.";
      };
      allowPing = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Answer ICMP echo requests (rate-limited).";
      };
      rulesetFile = lib.mkOption {
        type = lib.types.path;
        readOnly = true;
        default = rulesetFile;
        defaultText = lib.literalExpression "the ruleset rendered by modules/lib/egress-ruleset.nix";
        description = "The rendered ruleset; the agent's baseline names it.";
      };
    };

    antivirus.mirrorUrl = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "http://198.51.100.30:8080";
      description = ''
        The MSP's ClamAV signature mirror, by IP address, as freshclam's
        PrivateMirror. Required with services.clamav.updater and the egress
        firewall: freshclam's default mirrors are host names behind a CDN,
        which an address allowlist cannot admit, so without a mirror clamd
        never gets a database. Allowlisted as egress `av-mirror`. The mirror
        serves the .cvd/.cdiff files as ClamAV publishes them (for example
        kept current with cvdupdate on the MSP's side); freshclam verifies
        their signatures as usual.
      '';
    };

    updates = {
      substituterUrl = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "https://198.51.100.30";
        description = ''
          The binary cache the box updates from, by IP address: the box's only
          substituter (nix.settings.substituters), allowlisted as egress
          `update-cache`. Others would only be dropped by the firewall.
        '';
      };
      trustedPublicKeys = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "msp-cache-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" ];
        description = ''
          Signing keys of that cache (nix.settings.trusted-public-keys). A
          generation switch to a store path needs a signature by one of them.
        '';
      };
    };

    audit = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "auditd with the HIPAA rules of modules/lib/audit-rules.nix.";
      };
      lockRules = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = ''
          Make the audit rules immutable until reboot (auditctl -e 2). Stronger,
          but every rule change then needs a reboot, including those a
          nixos-rebuild switch brings.
        '';
      };
      extraRules = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "Additional auditctl lines.";
        example = [ "-w /var/lib/clinic-data -p wa -k phi-data" ];
      };
    };

    timeSync = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "chrony with the configured servers and an offset alarm.";
      };
      servers = lib.mkOption {
        type = lib.types.nonEmptyListOf lib.types.str;
        description = ''
          NTP servers (no default: a clinic box syncs to servers its MSP chooses). With the egress firewall on they must be IP addresses
          (nftables matches addresses), e.g. the site's or the MSP's NTP servers.
        '';
        example = [
          "192.0.2.123"
          "192.0.2.124"
        ];
      };
      maxOffsetMs = lib.mkOption {
        type = lib.types.ints.positive;
        default = agent.ntpMaxSkewMs or 5000;
        defaultText = lib.literalExpression "config.services.compliance-agent.ntpMaxSkewMs";
        description = "Clock offset that raises the alarm: chrony logs larger steps and the offset check unit fails.";
      };
    };

    journald = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Persistent journal with long retention.";
      };
      maxRetentionSec = lib.mkOption {
        type = lib.types.ints.positive;
        default = agent.baseline.logging.journaldMaxRetentionSec or (6 * 365 * 24 * 3600);
        defaultText = lib.literalExpression "config.services.compliance-agent.baseline.logging.journaldMaxRetentionSec";
        description = "How long journal entries are kept (MaxRetentionSec=).";
      };
      systemMaxUse = lib.mkOption {
        type = lib.types.str;
        default = "8G";
        description = "Disk space the journal may use (SystemMaxUse=).";
      };
    };

    ssh.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "OpenSSH with public keys only and no root password.";
    };

    encryption = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Require the data file systems to be on LUKS (see hosts/common/disko-luks.nix).
          Turn off only for machines that hold no data, such as test VMs.
        '';
      };
      mountPoints = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [
          "/"
          "/var/lib"
        ];
        description = "Mount points that must be on a LUKS device when they are defined in fileSystems.";
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (lib.mkIf cfg.firewall.enable {
        assertions = [
          {
            assertion = !config.networking.firewall.enable;
            message = "compliance.hardening.firewall replaces the NixOS firewall: remove networking.firewall.enable = true (inbound ports still come from networking.firewall.allowedTCPPorts/allowedUDPPorts), or set compliance.hardening.firewall.enable = false.";
          }
          {
            assertion = !(config.services.clamav.updater.enable or false) || cfg.antivirus.mirrorUrl != null;
            message = "services.clamav.updater is on, but freshclam's default mirrors are host names behind a CDN that the egress allowlist cannot admit: the box would never get signatures and av_health would fail for good. Set compliance.hardening.antivirus.mirrorUrl to the MSP's signature mirror by IP address (e.g. \"http://198.51.100.30:8080\"), or set compliance.hardening.firewall.enable = false.";
          }
          {
            assertion = !cfg.timeSync.enable || lib.all isIP cfg.timeSync.servers;
            message = "compliance.hardening.timeSync.servers must be IP addresses while the egress firewall is on (it matches addresses, not names); got ${toString cfg.timeSync.servers}. List NTP servers by address, or set compliance.hardening.firewall.enable = false.";
          }
        ];
        networking.firewall.enable = lib.mkDefault false;
        networking.nftables = {
          enable = true;
          inherit rulesetFile;
        };
        compliance.hardening.firewall.egress = {
          mcp = lib.mkIf (agentEnabled && agent.mcp.addresses != [ ]) {
            addresses = agent.mcp.addresses;
            ports = [ agent.mcp.port ];
          };
          ntp = lib.mkIf (cfg.timeSync.enable && lib.all isIP cfg.timeSync.servers) {
            addresses = cfg.timeSync.servers;
            proto = "udp";
            ports = [ 123 ];
          };
          dns = lib.mkIf (cfg.firewall.dnsServers != [ ]) {
            addresses = cfg.firewall.dnsServers;
            proto = "udp";
            ports = [ 53 ];
          };
          dns-tcp = lib.mkIf (cfg.firewall.dnsServers != [ ]) {
            addresses = cfg.firewall.dnsServers;
            ports = [ 53 ];
          };
          av-mirror = lib.mkIf (avMirror != null) {
            addresses = [ avMirror.address ];
            ports = [ avMirror.port ];
          };
          update-cache = lib.mkIf (updateCache != null) {
            addresses = [ updateCache.address ];
            ports = [ updateCache.port ];
          };
        };
        # The resolvers the allowlist admits are the ones the box uses;
        # DHCP's would only be dropped.
        networking.nameservers = cfg.firewall.dnsServers;
        networking.dhcpcd.extraConfig = "nooption domain_name_servers";
      })

      (lib.mkIf (cfg.antivirus.mirrorUrl != null) {
        services.clamav.updater.settings.PrivateMirror = [ cfg.antivirus.mirrorUrl ];
      })

      (lib.mkIf (cfg.updates.substituterUrl != null) {
        # The only cache the egress allowlist admits; any other (the default
        # cache.nixos.org) would only cost timeouts at every build.
        nix.settings.substituters = lib.mkForce [ cfg.updates.substituterUrl ];
        nix.settings.trusted-public-keys = cfg.updates.trustedPublicKeys;
      })

      (lib.mkIf cfg.audit.enable {
        security.auditd.enable = true;
        security.audit = {
          enable = if cfg.audit.lockRules then "lock" else true;
          failureMode = "printk";
          backlogLimit = 8192;
          rules = auditRuleLines;
        };
        # Every directory a rule needs exists before the rules load (a missing
        # one makes auditctl -R stop there, leaving the rest and -e unloaded).
        systemd.tmpfiles.rules = auditDirectories {
          rules = auditRuleLines;
          owners =
            lib.optionalAttrs agentEnabled {
              ${agent.stateDir} = "0750 ${agent.user} ${agent.user}";
            }
            // lib.genAttrs (map dirOf agentSecretFiles) (_: "0700 root root");
        };
        systemd.services.audit-rules-nixos = {
          after = [ "systemd-tmpfiles-setup.service" ];
          # Locked rules (-e 2) cannot be replaced until reboot: restarting the
          # unit in a switch would fail it and fail the switch. The new
          # generation's rules load at the next boot; until then the agent's
          # logging check reports them as pending a reboot (docs/nixos.md).
          restartIfChanged = !cfg.audit.lockRules;
        };
      })

      (lib.mkIf cfg.timeSync.enable {
        services.chrony = {
          enable = true;
          inherit (cfg.timeSync) servers;
          extraConfig = ''
            # Alarm: any clock correction larger than the limit is logged.
            logchange ${offsetLimitSeconds}
            # Step a clock more than 1 s off in the first updates after a start,
            # so the agent's resync_time (a restart, through polkit) corrects it.
            makestep 1 3
          '';
        };
        systemd.services.compliance-time-offset-check = {
          description = "Alarm when the clock is off by more than ${toString cfg.timeSync.maxOffsetMs} ms";
          after = [ "chronyd.service" ];
          path = [
            pkgs.chrony
            pkgs.gawk
            pkgs.coreutils
          ];
          serviceConfig = {
            Type = "oneshot";
            ExecStart = offsetCheck;
            DynamicUser = true;
            IPAddressDeny = "any";
            IPAddressAllow = "localhost";
            RestrictAddressFamilies = [
              "AF_INET"
              "AF_INET6"
              "AF_UNIX"
            ];
            NoNewPrivileges = true;
            CapabilityBoundingSet = "";
            ProtectSystem = "strict";
            ProtectHome = true;
          };
        };
        systemd.timers.compliance-time-offset-check = {
          wantedBy = [ "timers.target" ];
          timerConfig = {
            OnBootSec = "5min";
            OnUnitActiveSec = "15min";
          };
        };
      })

      (lib.mkIf cfg.journald.enable {
        services.journald.storage = "persistent";
        services.journald.extraConfig = ''
          MaxRetentionSec=${toString cfg.journald.maxRetentionSec}
          SystemMaxUse=${cfg.journald.systemMaxUse}
          Compress=yes
        '';
      })

      (lib.mkIf cfg.ssh.enable {
        services.openssh = {
          enable = true;
          openFirewall = lib.mkDefault true;
          settings = {
            PasswordAuthentication = false;
            KbdInteractiveAuthentication = false;
            PermitRootLogin = "prohibit-password";
            X11Forwarding = false;
            MaxAuthTries = lib.mkDefault 3;
            ClientAliveInterval = lib.mkDefault 300;
            ClientAliveCountMax = lib.mkDefault 2;
          };
        };
        # No root password: administrators log in with keys.
        users.users.root.hashedPassword = lib.mkDefault "!";
      })

      (lib.mkIf cfg.encryption.enable {
        assertions = [
          {
            assertion = unencryptedMounts == [ ];
            message = "compliance.hardening.encryption: ${toString unencryptedMounts} not on a LUKS device (boot.initrd.luks.devices). Partition the box with the LUKS2 layout of hosts/common/disko-luks.nix (the installer does), or set compliance.hardening.encryption.enable = false on machines that hold no ePHI, such as test VMs.";
          }
        ];
      })
    ]
  );
}
