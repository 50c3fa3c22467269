# NixOS module: the compliance agent as a hardened systemd service, its
# configuration and baseline generated from the host's own configuration, the
# polkit rule and root oneshot units it uses for privileged work.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.compliance-agent;
  # The pure functions tests/nix/check.sh evaluates and checks offline.
  pureLib = {
    serviceHardening = import ./lib/service-hardening.nix;
    polkitRule = import ./lib/polkit-rule.nix;
    baseline = import ./lib/baseline.nix;
  };

  settingsFormat = pkgs.formats.toml { };

  # Files the agent reads through systemd credentials (LoadCredential=), so
  # that neither their content nor a readable path ends up in the store or in
  # the agent user's reach. name -> source path on the host.
  credentials = lib.filterAttrs (_: path: path != null) {
    "signing-key" = cfg.signingKeyFile;
    "mcp-api-key" = cfg.mcp.apiKeyFile;
    "mcp-order-pubkey" = cfg.mcp.orderPublicKeyFile;
    "client-cert" = cfg.mcp.clientCertFile;
    "client-key" = cfg.mcp.clientKeyFile;
    "ca-cert" = cfg.mcp.caCertFile;
    "restic-password" = if backupJob != null then backupJob.passwordFile else null;
  };
  credentialPath = name: if credentials ? ${name} then "%d/${name}" else null;
  secretCredentials = [
    "signing-key"
    "mcp-api-key"
    "client-key"
    "restic-password"
  ];

  # ---------------------------------------------------------------- baseline
  # Conditions on definitions use hasBackup (an option of this module) and
  # never backupJob: reading services.restic.backups to decide whether to
  # define one of its entries would be infinite recursion.
  hasBackup = cfg.baseline.backup.resticJob != null;
  backupJob =
    if cfg.baseline.backup.resticJob != null then
      config.services.restic.backups.${cfg.baseline.backup.resticJob} or null
    else
      null;

  unitEntry = name: {
    inherit name;
    active = true;
    enabled = true;
  };

  # The units the host enables and the agent watches: the security services
  # this configuration turns on, plus the operator's list.
  watchedUnits = lib.unique (
    lib.optional config.services.openssh.enable "sshd.service"
    ++ lib.optional config.networking.nftables.enable "nftables.service"
    ++ lib.optional config.services.chrony.enable "chronyd.service"
    ++ lib.optional config.security.auditd.enable "auditd.service"
    ++ lib.optional config.services.clamav.daemon.enable "clamav-daemon.service"
    ++ lib.optional config.services.clamav.updater.enable "clamav-freshclam.timer"
    ++ lib.optional config.services.prometheus.exporters.node.enable "prometheus-node-exporter.service"
    ++ lib.optional (backupJob != null) "restic-backups-${cfg.baseline.backup.resticJob}.timer"
    ++ cfg.serviceHealthChecks
  );

  luksNames = lib.attrNames config.boot.initrd.luks.devices;
  onLuks = device: lib.any (name: device == "/dev/mapper/${name}") luksNames;
  encryptedFilesystems = lib.sort lib.lessThan (
    lib.mapAttrsToList (_: fs: fs.mountPoint) (
      lib.filterAttrs (_: fs: fs.device != null && onLuks fs.device) config.fileSystems
    )
  );
  swapEncrypted =
    config.swapDevices == [ ]
    || lib.all (s: (s.randomEncryption.enable or false) || onLuks (s.device or "")) config.swapDevices;

  hardeningCfg = config.compliance.hardening or { };
  applianceFirewall = (hardeningCfg.enable or false) && (hardeningCfg.firewall.enable or false);
  journaldPersistent = config.services.journald.storage == "persistent";

  baselineDocument = pureLib.baseline {
    inherit (cfg) policyVersion;
    units =
      map unitEntry watchedUnits
      ++ map (name: {
        inherit name;
        active = false;
        enabled = false;
      }) cfg.baseline.inactiveUnits;
    patching = {
      system_profile = "/nix/var/nix/profiles/system";
      target_system = cfg.baseline.patching.targetSystem;
      target_revision =
        if cfg.baseline.patching.targetRevision != null then
          cfg.baseline.patching.targetRevision
        else
          config.system.configurationRevision;
      max_generation_age_days = cfg.baseline.patching.maxGenerationAgeDays;
    };
    avHealth =
      if cfg.avHealthCheck && config.services.clamav.daemon.enable then
        {
          units = [
            "clamav-daemon.service"
          ]
          ++ lib.optional config.services.clamav.updater.enable "clamav-freshclam.timer";
          clamd_socket = "/run/clamav/clamd.ctl";
          database_dir = "/var/lib/clamav";
          max_signature_age_hours = cfg.baseline.avHealth.maxSignatureAgeHours;
          eicar_test = cfg.baseline.avHealth.eicarTest;
        }
      else
        null;
    backup =
      if backupJob != null then
        {
          tool = "restic";
          repository = backupJob.repository;
          password_file = credentialPath "restic-password";
          unit = "restic-backups-${cfg.baseline.backup.resticJob}.service";
          max_snapshot_age_hours = cfg.baseline.backup.maxSnapshotAgeHours;
          restore_test_unit = "compliance-agent-restore-test.service";
          max_restore_test_age_days = cfg.baseline.backup.maxRestoreTestAgeDays;
        }
      else
        null;
    logging = {
      journald_persistent = journaldPersistent;
      journald_max_retention_sec = cfg.baseline.logging.journaldMaxRetentionSec;
      auditd = config.security.auditd.enable;
      audit_rules = config.security.audit.rules;
      audit_rules_export_file = if auditEnabled then auditExportFile else null;
      audit_rules_export_unit = if auditEnabled then "compliance-agent-audit-export.service" else null;
    };
    firewall =
      if cfg.firewallEnforce && config.networking.nftables.enable then
        {
          unit = "nftables.service";
          ruleset_file = if applianceFirewall then "${hardeningCfg.firewall.rulesetFile}" else null;
          egress_policy = if applianceFirewall then "drop" else "accept";
          ruleset_export_unit = "compliance-agent-nft-export.service";
          ruleset_export_file = rulesetExportFile;
          expected_export_file = if applianceFirewall then expectedExportFile else null;
        }
      else
        null;
    encryption =
      if cfg.encryptionVerify then
        {
          filesystems = encryptedFilesystems;
          swap = swapEncrypted;
          allowed_ciphers = cfg.baseline.encryption.allowedCiphers;
          min_key_bits = cfg.baseline.encryption.minKeyBits;
        }
      else
        null;
    timeSync =
      if config.services.chrony.enable then
        {
          unit = "chronyd.service";
          inherit (config.services.chrony) servers;
          max_offset_ms = cfg.ntpMaxSkewMs;
          max_stratum = cfg.baseline.timeSync.maxStratum;
        }
      else
        null;
  };
  baselineFile = pkgs.writeText "compliance-baseline.json" (builtins.toJSON baselineDocument);

  # ---------------------------------------------------------------- config
  settings = lib.filterAttrs (_: v: v != null) {
    site_id = cfg.siteId;
    host_id = cfg.hostId;
    deployment_mode = cfg.deploymentMode;
    reseller_id = cfg.resellerId;
    mcp_url = cfg.mcp.url;
    mcp_api_key_file = credentialPath "mcp-api-key";
    mcp_poll_interval_sec = cfg.mcp.pollIntervalSec;
    mcp_order_pubkey_file = credentialPath "mcp-order-pubkey";
    ca_cert_file = credentialPath "ca-cert";
    client_cert_file = credentialPath "client-cert";
    client_key_file = credentialPath "client-key";
    evidence_dir = cfg.evidenceDir;
    evidence_retention_days = cfg.evidenceRetentionDays;
    maintenance_window = cfg.maintenanceWindow;
    inherit (cfg) timezone;
    signing_key_file = credentialPath "signing-key";
    baseline_path = "${baselineFile}";
    policy_version = cfg.policyVersion;
    auto_apply_updates = cfg.autoApplyUpdates;
    log_level = cfg.logLevel;
    log_file = cfg.logFile;
    ntp_max_skew_ms = cfg.ntpMaxSkewMs;
    backup_path = cfg.backupPath;
    restore_test_schedule = cfg.restoreTestSchedule;
    av_health_check = cfg.avHealthCheck;
    firewall_enforce = cfg.firewallEnforce;
    encryption_verify = cfg.encryptionVerify;
    service_health_checks = cfg.serviceHealthChecks;
    health_check_timeout_sec = cfg.healthCheckTimeoutSec;
    order_runbook_allowlist = cfg.orderRunbookAllowlist;
    custom_checks_dir = cfg.customChecksDir;
    state_dir = cfg.stateDir;
    metrics_dir = cfg.metricsDir;
  };
  configFile = settingsFormat.generate "compliance-agent.toml" settings;

  # ---------------------------------------------------------------- root helpers
  rulesetExportFile = "/run/compliance-agent-export/ruleset.json";
  expectedExportFile = "/run/compliance-agent-export/expected.json";
  systemProfile = "/nix/var/nix/profiles/system";
  auditExportFile = "/run/compliance-agent-export/audit-rules.txt";
  # security.audit.enable is false, true or "lock".
  auditEnabled = config.security.audit.enable != false;

  rootHelpers = import ./lib/root-helpers.nix {
    inherit
      systemProfile
      rulesetExportFile
      expectedExportFile
      auditExportFile
      ;
    rulesetFile = if applianceFirewall then "${hardeningCfg.firewall.rulesetFile}" else null;
  };
  switchScript = pkgs.writeShellScript "compliance-agent-switch" rootHelpers.switch;
  rollbackScript = pkgs.writeShellScript "compliance-agent-rollback" rootHelpers.rollback;

  exportScript = pkgs.writeShellScript "compliance-agent-nft-export" rootHelpers.nftExport;
  auditExportScript = pkgs.writeShellScript "compliance-agent-audit-export" rootHelpers.auditExport;
  # What the root export units share: the world-readable directory they
  # write to (kept between runs for the agent to read) and their timer.
  exportRuntimeDirectory = {
    RuntimeDirectory = "compliance-agent-export";
    RuntimeDirectoryMode = "0755";
    RuntimeDirectoryPreserve = true;
  };
  exportTimer = {
    wantedBy = [ "timers.target" ];
    timerConfig = {
      OnBootSec = "1min";
      OnUnitActiveSec = "5min";
    };
  };

  # The CLI as administrators use it: as the agent's user, with the same
  # credentials the service gets, so `%d/...` paths resolve and evidence
  # keeps its owner.
  adminCli = pkgs.writeShellScriptBin "compliance-agent-admin" ''
    exec ${config.systemd.package}/bin/systemd-run --quiet --pipe --wait --collect \
      --uid=${cfg.user} --gid=${cfg.user} \
      --setenv=COMPLIANCE_AGENT_CONFIG=${configFile} \
      ${lib.concatMapStringsSep " " (c: "--property=LoadCredential=${c}") (lib.mapAttrsToList (name: path: "${name}:${path}") credentials)} \
      ${lib.getExe' cfg.package "compliance-agent"} "$@"
  '';

  restoreCanaryDir = "/var/lib/compliance-agent-restore-canary";
  restoreTestScript = pkgs.writeShellScript "compliance-agent-restore-test" ''
    set -euo pipefail
    target="$(mktemp -d /tmp/restore-test.XXXXXX)"
    trap 'rm -rf "$target"' EXIT
    restic restore latest --target "$target" --include ${restoreCanaryDir}
    if ! cmp -s "$target${restoreCanaryDir}/canary" ${restoreCanaryDir}/canary.previous \
      && ! cmp -s "$target${restoreCanaryDir}/canary" ${restoreCanaryDir}/canary; then
      echo "restored canary does not match the one written before the backup" >&2
      exit 1
    fi
    date --utc +%Y-%m-%dT%H:%M:%SZ > /var/lib/compliance-agent-restore-test/last-success
  '';

in
{
  options.services.compliance-agent = {
    enable = lib.mkEnableOption "the HIPAA compliance agent (drift detection, healing and signed evidence)";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The compliance-agent package. The flake's module sets it to the flake's own build.";
      example = lib.literalExpression "inputs.compliance-appliance.packages.\${pkgs.system}.compliance-agent";
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "compliance-agent";
      description = "System user the agent runs as. The polkit rule grants unit control to this user only.";
    };

    siteId = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9][A-Za-z0-9_.-]*";
      description = "Identifier of the clinic site, as registered at the MCP.";
      example = "clinic-springfield";
    };

    hostId = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9][A-Za-z0-9_.-]*";
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "Identifier of this box within the site.";
      example = "frontdesk-01";
    };

    deploymentMode = lib.mkOption {
      type = lib.types.enum [
        "reseller"
        "direct"
      ];
      description = ''
        "reseller" when a reseller MSP manages the box for the clinic (then
        `resellerId` is required), "direct" when the MSP manages it itself.
      '';
      example = "direct";
    };

    resellerId = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Identifier of the reseller; required in reseller mode.";
      example = "reseller-northwind";
    };

    mcp = {
      url = lib.mkOption {
        type = lib.types.nullOr (lib.types.strMatching "https://.*");
        default = null;
        description = ''
          Base URL of the MSP's central server (MCP). Null runs the agent
          offline: evidence is queued until a URL is configured.
        '';
        example = "https://mcp.example-msp.net:8443";
      };
      addresses = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = ''
          IP addresses (or CIDR prefixes) of the MCP. The agent's sandbox
          (IPAddressAllow=) and the egress firewall allow only these; host
          names cannot be matched there, so map the URL's host name with
          `networking.hosts` or allow DNS.
        '';
        example = [ "203.0.113.10" ];
      };
      port = lib.mkOption {
        type = lib.types.port;
        default = 443;
        description = "TCP port of the MCP, for the egress allowlist.";
        example = 8443;
      };
      pollIntervalSec = lib.mkOption {
        type = lib.types.ints.between 10 86400;
        default = 60;
        description = "Seconds between polls of the MCP for orders.";
      };
      apiKeyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "Root-readable file outside the Nix store with the MCP API key (passed as a credential).";
        example = lib.literalExpression ''config.sops.secrets."compliance-agent/mcp-api-key".path'';
      };
      orderPublicKeyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "The MCP's order-signing public key (SPKI PEM). Orders signed by any other key are rejected.";
        example = "/etc/compliance-agent/mcp-order.pub.pem";
      };
      caCertFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "The CA certificate (PEM) the agent trusts for the MCP; the only trust anchor.";
        example = "/etc/compliance-agent/mcp-ca.pem";
      };
      clientCertFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "This box's client certificate (PEM) for mutual TLS, issued by the MSP from the enrolment CSR.";
        example = "/var/lib/compliance-agent-keys/client.crt";
      };
      clientKeyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "Root-readable file outside the Nix store with the client certificate's private key.";
        example = "/var/lib/compliance-agent-keys/client.key";
      };
    };

    signingKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = ''
        Root-readable file outside the Nix store with the Ed25519 evidence
        signing key (PKCS#8 PEM), as written by `compliance-agent keygen`.
        The installer creates it at enrolment; it reaches the agent through
        LoadCredential=, never through the store.
      '';
      example = "/var/lib/compliance-agent-keys/signing.key";
    };

    evidenceDir = lib.mkOption {
      type = lib.types.str;
      default = "${cfg.stateDir}/evidence";
      defaultText = lib.literalExpression ''"''${config.services.compliance-agent.stateDir}/evidence"'';
      description = "Where signed evidence bundles are stored. Must be inside stateDir (the sandbox makes only that writable).";
    };

    evidenceRetentionDays = lib.mkOption {
      type = lib.types.ints.positive;
      default = 90;
      description = "Days evidence is kept locally before it is pruned (behind a signed checkpoint).";
      example = 2190;
    };

    maintenanceWindow = lib.mkOption {
      type = lib.types.strMatching "[0-2][0-9]:[0-5][0-9]-[0-2][0-9]:[0-5][0-9]";
      default = "02:00-04:00";
      description = "Daily window (HH:MM-HH:MM, may cross midnight) in which disruptive fixes run; outside it they are deferred.";
      example = "22:00-05:00";
    };

    timezone = lib.mkOption {
      type = lib.types.str;
      default = "UTC";
      description = "IANA time zone of the maintenance window.";
      example = "America/Chicago";
    };

    policyVersion = lib.mkOption {
      type = lib.types.str;
      description = "Version of the MSP's policy this baseline implements; recorded in every evidence bundle.";
      example = "2026.11";
    };

    autoApplyUpdates = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Whether the agent may switch to the baseline's target system on its own (inside the maintenance window).";
    };

    logLevel = lib.mkOption {
      type = lib.types.enum [
        "DEBUG"
        "INFO"
        "WARNING"
        "ERROR"
        "CRITICAL"
      ];
      default = "INFO";
      description = "Agent log level (the journal receives the logs).";
    };

    logFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Additional log file; must be inside stateDir. Null logs to the journal only.";
    };

    ntpMaxSkewMs = lib.mkOption {
      type = lib.types.ints.positive;
      default = 5000;
      description = "Largest clock offset (milliseconds) the time_sync check accepts.";
    };

    backupPath = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Path whose backup the agent verifies, when no restic job is named in the baseline.";
      example = "/var/lib/clinic-data";
    };

    restoreTestSchedule = lib.mkOption {
      type = lib.types.enum [
        "daily"
        "weekly"
        "monthly"
      ];
      default = "weekly";
      description = "How often a restore test must have succeeded.";
    };

    avHealthCheck = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Check ClamAV's health (when services.clamav.daemon is enabled).";
    };

    firewallEnforce = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Check the live nftables ruleset against the baseline and restore it on drift.";
    };

    encryptionVerify = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Check that data file systems and swap are on LUKS.";
    };

    serviceHealthChecks = lib.mkOption {
      type = lib.types.listOf (lib.types.strMatching "[A-Za-z0-9:_.@\\-]+\\.(service|socket|timer|target|path|mount)");
      default = [ ];
      description = ''
        Extra units that must be active. They join the baseline's unit list and
        the polkit allowlist (the agent may start, restart and stop them).
      '';
      example = [ "postgresql.service" ];
    };

    healthCheckTimeoutSec = lib.mkOption {
      type = lib.types.ints.between 1 3600;
      default = 60;
      description = ''
        Seconds the units in serviceHealthChecks (and the MCP, when configured)
        may take to be healthy after a generation switch before the agent
        switches back to the previous generation.
      '';
      example = 120;
    };

    orderRunbookAllowlist = lib.mkOption {
      type = lib.types.listOf (
        lib.types.enum [
          "collect_evidence"
          "restart_unit"
          "stop_unit"
          "reapply_firewall"
          "run_backup"
          "restore_test"
          "refresh_av_signatures"
          "resync_time"
          "switch_generation"
          "rollback_generation"
        ]
      );
      # Signed orders still pass the unit allowlist and the maintenance window;
      # generation changes by order are opt-in.
      default = [
        "collect_evidence"
        "restart_unit"
        "reapply_firewall"
        "run_backup"
        "restore_test"
        "refresh_av_signatures"
      ];
      description = "Runbooks the MSP may order on this box (orders for any other runbook are refused with a signed bundle).";
      example = lib.literalExpression ''[ "collect_evidence" "restart_unit" "switch_generation" ]'';
    };

    customChecksDir = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "Directory of site-specific check definitions.";
    };

    stateDir = lib.mkOption {
      type = lib.types.strMatching "/var/lib/[A-Za-z0-9_.-]+";
      default = "/var/lib/compliance-agent";
      description = "State directory (SQLite queue, chain head). Created by systemd as StateDirectory=.";
    };

    metricsDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/compliance-agent-metrics";
      description = "node-exporter textfile collector directory the agent writes its .prom file to.";
    };

    watchdogSec = lib.mkOption {
      type = lib.types.ints.positive;
      default = 120;
      description = "systemd watchdog timeout; the agent pings at half of it and is restarted if it hangs.";
    };

    nodeExporter.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Enable the Prometheus node exporter with the textfile collector reading metricsDir.";
    };

    baseline = {
      inactiveUnits = lib.mkOption {
        type = lib.types.listOf (lib.types.strMatching "[A-Za-z0-9:_.@\\-]+\\.(service|socket|timer)");
        default = [ ];
        description = ''
          Units that must not run on this box. The agent may stop them (and
          only stop them); they appear in the baseline as inactive.
        '';
        example = [ "telnet.socket" ];
      };
      patching = {
        targetSystem = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          description = "Store path of the system the MSP wants this box on; null when the running generation is the target.";
        };
        targetRevision = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          defaultText = lib.literalExpression "config.system.configurationRevision";
          description = "Flake revision the box should run; defaults to the revision this system is built from.";
        };
        maxGenerationAgeDays = lib.mkOption {
          type = lib.types.ints.positive;
          default = 45;
          description = "Oldest acceptable age of the running generation (patch cadence).";
        };
      };
      avHealth = {
        maxSignatureAgeHours = lib.mkOption {
          type = lib.types.ints.positive;
          default = 48;
          description = "Oldest acceptable ClamAV signature database.";
        };
        eicarTest = lib.mkOption {
          type = lib.types.bool;
          default = true;
          description = "Whether the check scans the EICAR test string through clamd.";
        };
      };
      backup = {
        resticJob = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          description = "Name of the services.restic.backups job the backup check watches; null when the box has none.";
          example = "clinic";
        };
        maxSnapshotAgeHours = lib.mkOption {
          type = lib.types.ints.positive;
          default = 26;
          description = "Oldest acceptable latest snapshot.";
        };
        maxRestoreTestAgeDays = lib.mkOption {
          type = lib.types.ints.positive;
          default = 7;
          description = "Oldest acceptable successful restore test.";
        };
      };
      logging.journaldMaxRetentionSec = lib.mkOption {
        type = lib.types.ints.positive;
        default = 6 * 365 * 24 * 3600;
        defaultText = lib.literalExpression "6 * 365 * 24 * 3600";
        description = "Journal retention the logging check expects (HIPAA keeps documentation six years).";
      };
      encryption = {
        allowedCiphers = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ "aes-xts-plain64" ];
          description = "LUKS ciphers the encryption check accepts.";
        };
        minKeyBits = lib.mkOption {
          type = lib.types.ints.positive;
          default = 512;
          description = "Smallest LUKS key size accepted (512 bits = AES-256 in XTS mode).";
        };
      };
      timeSync.maxStratum = lib.mkOption {
        type = lib.types.ints.between 1 15;
        default = 4;
        description = "Highest NTP stratum accepted.";
      };
    };

    configFile = lib.mkOption {
      type = lib.types.path;
      readOnly = true;
      default = configFile;
      defaultText = lib.literalExpression "generated from the options above";
      description = "The rendered agent configuration (TOML, no secrets).";
    };

    baselineFile = lib.mkOption {
      type = lib.types.path;
      readOnly = true;
      default = baselineFile;
      defaultText = lib.literalExpression "generated from the host's configuration";
      description = "The generated baseline (JSON, schema v1 in docs/baseline.md).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.deploymentMode != "reseller" || cfg.resellerId != null;
        message = ''services.compliance-agent: deploymentMode is "reseller" but resellerId is null. Set services.compliance-agent.resellerId = "<reseller id from the MCP>", or use deploymentMode = "direct".'';
      }
      {
        assertion = cfg.deploymentMode != "direct" || cfg.resellerId == null;
        message = ''services.compliance-agent: resellerId is set but deploymentMode is "direct". Remove resellerId or set deploymentMode = "reseller".'';
      }
      {
        assertion = cfg.signingKeyFile != null;
        message = ''services.compliance-agent is enabled without a signing key, so it could not sign evidence. Set services.compliance-agent.signingKeyFile to a root-only file outside the Nix store: run `compliance-agent keygen --out /var/lib/compliance-agent-keys` (the installer does this at enrolment) and use "/var/lib/compliance-agent-keys/signing.key", or a sops-nix secret's path.'';
      }
      {
        assertion = cfg.mcp.url == null || cfg.mcp.addresses != [ ];
        message = ''services.compliance-agent.mcp.url is set but mcp.addresses is empty; the sandbox and the egress firewall match addresses, not names. Set services.compliance-agent.mcp.addresses = [ "<MCP IP>" ].'';
      }
      {
        assertion = cfg.mcp.url == null || (cfg.mcp.caCertFile != null && cfg.mcp.clientCertFile != null && cfg.mcp.clientKeyFile != null);
        message = "services.compliance-agent.mcp.url is set, but the mTLS files are not: set mcp.caCertFile, mcp.clientCertFile and mcp.clientKeyFile (the installer's enrolment prints the CSR the MSP signs).";
      }
      {
        assertion = cfg.baseline.backup.resticJob == null || backupJob != null;
        message = "services.compliance-agent.baseline.backup.resticJob = \"${toString cfg.baseline.backup.resticJob}\" names no services.restic.backups job. Define the job or set resticJob = null.";
      }
      {
        assertion = backupJob == null || (backupJob.repository != null && backupJob.passwordFile != null);
        message = "services.compliance-agent: the restic job \"${toString cfg.baseline.backup.resticJob}\" must set repository and passwordFile (not repositoryFile/environmentFile) for the backup check and the restore test to read it.";
      }
      {
        assertion = lib.all (u: !(lib.elem u watchedUnits)) cfg.baseline.inactiveUnits;
        message = "services.compliance-agent.baseline.inactiveUnits lists units the host enables or serviceHealthChecks requires: ${toString (lib.filter (u: lib.elem u watchedUnits) cfg.baseline.inactiveUnits)}. Remove them from one of the lists.";
      }
      {
        assertion = lib.hasPrefix "${cfg.stateDir}/" cfg.evidenceDir;
        message = "services.compliance-agent.evidenceDir (${cfg.evidenceDir}) must be inside stateDir (${cfg.stateDir}); the sandbox makes only that writable.";
      }
    ]
    ++ map (name: {
      assertion = !(lib.hasPrefix builtins.storeDir (toString credentials.${name}));
      message = "services.compliance-agent: the secret '${name}' (${toString credentials.${name}}) is in the Nix store, which every user can read. Point the option at a root-only file outside the store (e.g. a sops-nix secret's path).";
    }) (lib.filter (n: credentials ? ${n}) secretCredentials);

    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.user;
      description = "HIPAA compliance agent";
    };
    users.groups.${cfg.user} = { };

    environment.systemPackages = [
      cfg.package
      adminCli
    ];
    # The CLI (status, evidence verify, ...) reads the same configuration.
    environment.variables.COMPLIANCE_AGENT_CONFIG = "/etc/compliance-agent/config.toml";
    environment.etc."compliance-agent/config.toml".source = configFile;
    environment.etc."compliance-agent/baseline.json".source = baselineFile;

    systemd.tmpfiles.rules = [
      # Readable by the node exporter, writable by the agent only.
      "d ${cfg.metricsDir} 0755 ${cfg.user} ${cfg.user} - -"
      # The agent runs with UMask=0077; a default ACL keeps its .prom files
      # readable by the node exporter (a default ACL takes precedence over the umask).
      "A+ ${cfg.metricsDir} - - - - default:user::rw-,default:group::r--,default:other::r--"
      "d /var/lib/compliance-agent-keys 0700 root root - -"
    ];

    systemd.services.compliance-agent = {
      description = "HIPAA compliance agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "dbus.service"
        "polkit.service"
      ];
      restartTriggers = [
        configFile
        baselineFile
      ];
      environment.COMPLIANCE_AGENT_CONFIG = "${configFile}";
      serviceConfig =
        pureLib.serviceHardening {
          inherit (cfg) user;
          stateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
          readWritePaths = [ cfg.metricsDir ];
          allowedAddresses =
            cfg.mcp.addresses ++ lib.optionals (backupJob != null) (hardeningCfg.firewall.egress.backup.addresses or [ ]);
          supplementaryGroups = lib.optional config.services.clamav.daemon.enable "clamav";
        }
        // {
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = "${toString cfg.watchdogSec}s";
          ExecStart = "${lib.getExe' cfg.package "compliance-agent"} run --config ${configFile}";
          Restart = "on-failure";
          RestartSec = "10s";
          LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") credentials;
        };
    };

    # Root oneshots the agent starts over D-Bus (polkit allows "start" only).
    systemd.services."compliance-agent-switch@" = {
      description = "Switch to system generation %i (requested by the compliance agent)";
      path = [ config.nix.package ];
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${switchScript} %i";
      };
    };
    systemd.services.compliance-agent-rollback = {
      description = "Roll back to the previous system generation (requested by the compliance agent)";
      path = [ config.nix.package ];
      serviceConfig = {
        Type = "oneshot";
        ExecStart = rollbackScript;
      };
    };
    systemd.services.compliance-agent-nft-export = lib.mkIf config.networking.nftables.enable {
      description = "Export the live nftables ruleset for the compliance agent";
      # Reading the ruleset needs CAP_NET_ADMIN, which the agent does not have;
      # loading the baseline ruleset into a throwaway network namespace (to list
      # it the way the kernel does) needs CAP_SYS_ADMIN for unshare.
      path = [
        pkgs.nftables
        pkgs.coreutils
        pkgs.util-linux
      ];
      serviceConfig = exportRuntimeDirectory // {
        Type = "oneshot";
        ExecStart = exportScript;
        CapabilityBoundingSet = [
          "CAP_NET_ADMIN"
          "CAP_SYS_ADMIN"
        ];
        PrivateNetwork = false;
        ProtectSystem = "strict";
        ProtectHome = true;
        NoNewPrivileges = true;
      };
    };
    systemd.timers.compliance-agent-nft-export = lib.mkIf config.networking.nftables.enable exportTimer;

    systemd.services.compliance-agent-audit-export = lib.mkIf auditEnabled {
      description = "Export the audit rules in force for the compliance agent";
      # Listing the rules and the audit state needs CAP_AUDIT_CONTROL, which
      # the agent does not have. The audit netlink socket exists only in the
      # host's network namespace, so no PrivateNetwork.
      path = [
        pkgs.audit
        pkgs.coreutils
        pkgs.gnused
      ];
      serviceConfig = exportRuntimeDirectory // {
        Type = "oneshot";
        ExecStart = auditExportScript;
        CapabilityBoundingSet = [ "CAP_AUDIT_CONTROL" ];
        RestrictAddressFamilies = [
          "AF_NETLINK"
          "AF_UNIX"
        ];
        ProtectSystem = "strict";
        ProtectHome = true;
        NoNewPrivileges = true;
      };
    };
    systemd.timers.compliance-agent-audit-export = lib.mkIf auditEnabled exportTimer;

    systemd.services.compliance-agent-restore-test = lib.mkIf hasBackup {
      description = "Restore test of the ${cfg.baseline.backup.resticJob} backup (requested by the compliance agent)";
      path = [
        pkgs.restic
        pkgs.coreutils
        pkgs.diffutils
      ];
      environment = {
        RESTIC_REPOSITORY = backupJob.repository;
        RESTIC_PASSWORD_FILE = backupJob.passwordFile;
      };
      serviceConfig = {
        Type = "oneshot";
        ExecStart = restoreTestScript;
        StateDirectory = "compliance-agent-restore-test";
        StateDirectoryMode = "0755";
        PrivateTmp = true;
      };
    };
    services.restic.backups = lib.mkIf hasBackup {
      ${cfg.baseline.backup.resticJob} = {
        paths = [ restoreCanaryDir ];
        # A fresh canary before each backup is what the restore test looks for.
        backupPrepareCommand = ''
          mkdir -p ${restoreCanaryDir}
          if [ -f ${restoreCanaryDir}/canary ]; then cp ${restoreCanaryDir}/canary ${restoreCanaryDir}/canary.previous; fi
          head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > ${restoreCanaryDir}/canary
        '';
      };
    };

    security.polkit.enable = true;
    security.polkit.extraConfig = pureLib.polkitRule {
      inherit (cfg) user;
      # start and restart only: a compromised agent must not be able to stop
      # the firewall, auditd or sshd.
      manageUnits = watchedUnits;
      stopUnits = cfg.baseline.inactiveUnits;
      startUnits = [
        "compliance-agent-rollback.service"
      ]
      ++ lib.optional config.networking.nftables.enable "compliance-agent-nft-export.service"
      ++ lib.optional auditEnabled "compliance-agent-audit-export.service"
      ++ lib.optional hasBackup "compliance-agent-restore-test.service";
      startTemplates = [ "compliance-agent-switch@" ];
    };

    services.prometheus.exporters.node = lib.mkIf cfg.nodeExporter.enable {
      enable = true;
      enabledCollectors = [
        "systemd"
        "textfile"
      ];
      extraFlags = [ "--collector.textfile.directory=${cfg.metricsDir}" ];
      # Scraped by the MSP over the site VPN; opening the port is the host's call.
      openFirewall = lib.mkDefault false;
    };
  };
}
