# The MSP's central server (mcp-server): enrollment, evidence intake into a
# database and a WORM archive, fleet state, signed orders.
#
# Settings are the server's own TOML (rendered with pkgs.formats.toml); secrets
# (order key, TLS key, agent API key, S3 secret) never enter the Nix store: they
# are `*File` options passed as LoadCredential and read from
# /run/credentials/mcp-server.service/. The unit's sandbox is the pure function
# lib/mcp-server-hardening.nix, scored offline by tests/nix/check.sh.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.mcp-server;
  settingsFormat = pkgs.formats.toml { };
  credentials = "/run/credentials/mcp-server.service";
  hardening = import ./lib/mcp-server-hardening.nix {
    user = cfg.user;
    inherit (cfg) allowedAddresses;
  };

  # What the options put into the TOML besides `settings`.
  derived = lib.filterAttrs (_: v: v != null) {
    order_key_file = if cfg.orderKeyFile != null then "${credentials}/order-signing.key" else null;
    tls_cert_file = if cfg.tls.certFile != null then "${credentials}/tls.pem" else null;
    tls_key_file = if cfg.tls.keyFile != null then "${credentials}/tls.key" else null;
    client_ca_file = cfg.clientCaFile;
    agent_api_key_file = if cfg.agentApiKeyFile != null then "${credentials}/agent-api-key" else null;
    database_url =
      if cfg.database == "postgresql" then
        # Peer authentication over the local socket: no password exists.
        "postgres://${cfg.user}@%2Frun%2Fpostgresql/${cfg.user}"
      else
        null;
    archive_s3 =
      if cfg.archive.backend == "local" then
        null
      else
        {
          inherit (cfg.archive.s3) bucket region;
          endpoint = if cfg.archive.backend == "minio" then "http://127.0.0.1:9000" else cfg.archive.s3.endpoint;
          force_path_style = cfg.archive.backend == "minio" || cfg.archive.s3.forcePathStyle;
          access_key_id = cfg.archive.s3.accessKeyId;
          secret_access_key_file = "${credentials}/s3-secret";
        };
  };
  configFile = settingsFormat.generate "mcp-server.toml" (cfg.settings // derived);

  loadCredential =
    lib.optional (cfg.orderKeyFile != null) "order-signing.key:${cfg.orderKeyFile}"
    ++ lib.optional (cfg.tls.certFile != null) "tls.pem:${cfg.tls.certFile}"
    ++ lib.optional (cfg.tls.keyFile != null) "tls.key:${cfg.tls.keyFile}"
    ++ lib.optional (cfg.agentApiKeyFile != null) "agent-api-key:${cfg.agentApiKeyFile}"
    ++ lib.optional (
      cfg.archive.backend != "local" && cfg.archive.s3.secretAccessKeyFile != null
    ) "s3-secret:${cfg.archive.s3.secretAccessKeyFile}";

  # The operator CLI on this machine: the server's own commands, as its user, on
  # its configuration (files it creates stay the server's).
  admin = pkgs.writeShellScriptBin "mcp-server-admin" ''
    exec ${pkgs.util-linux}/bin/runuser -u ${cfg.user} -- ${lib.getExe cfg.package} --config ${configFile} "$@"
  '';

  port = address: lib.toInt (lib.last (lib.splitString ":" address));

  # Prometheus runs on this machine: it reaches the operator listener on loopback.
  scrapeTarget =
    let
      listen = cfg.settings.operator_listen;
    in
    if lib.hasPrefix "[" listen then
      "[::1]:${toString (port listen)}"
    else
      "127.0.0.1:${toString (port listen)}";

  # The fleet dashboard alone, as Grafana's file provider reads a directory.
  dashboards = pkgs.runCommand "mcp-server-dashboards" { } ''
    mkdir -p $out
    cp ${./dashboards/mcp-fleet.json} $out/mcp-fleet.json
  '';
in
{
  options.services.mcp-server = {
    enable = lib.mkEnableOption "the MSP's central server for compliance appliances (mcp-server)";

    monitoring = {
      prometheus = {
        enable = lib.mkEnableOption "a scrape job for the server's fleet metrics (/metrics on the operator listener) in this machine's services.prometheus";
        scrapeInterval = lib.mkOption {
          type = lib.types.str;
          # The platform's dashboard refreshes every 30 s.
          default = "30s";
          description = "How often Prometheus reads /metrics; each read computes the fleet state from the database.";
        };
        tokenFile = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          example = "/run/secrets/prometheus/mcp-operator-token";
          description = ''
            A file holding an operator token (`mcp-server-admin users add`) that Prometheus
            sends as its bearer token; it must be readable by the prometheus user and is
            never copied into the Nix store. The figures cover that operator's tenants (an
            admin's: the whole fleet). Needed unless settings.metrics.access = "loopback".
          '';
        };
        caFile = lib.mkOption {
          type = lib.types.str;
          example = "/etc/mcp-server/operator-ca.pem";
          description = ''
            The CA certificate Prometheus checks the operator listener's certificate with: a
            copy of the server's <state_dir>/ca/ca.pem, or your CA's when tls.certFile is set.
          '';
        };
        serverName = lib.mkOption {
          type = lib.types.str;
          default = lib.head cfg.settings.server_names;
          defaultText = lib.literalExpression "lib.head config.services.mcp-server.settings.server_names";
          description = "The name Prometheus expects in the certificate (it connects to the loopback address).";
        };
      };
      grafana.enable = lib.mkEnableOption "the fleet dashboard (modules/dashboards/mcp-fleet.json, per reseller and site) in this machine's services.grafana, provisioned from the Nix store";
    };

    package = lib.mkOption {
      type = lib.types.package;
      description = "The mcp-server package (the flake's `packages.<system>.mcp-server`).";
      example = lib.literalExpression "inputs.compliance.packages.\${pkgs.system}.mcp-server";
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "mcp-server";
      description = "System user the server runs as; also its PostgreSQL role and database name.";
    };

    settings = lib.mkOption {
      description = ''
        The server's TOML configuration (see mcp-server/src/config.rs; unknown keys
        are refused at start). Secrets do not go here: use the `*File` options.
      '';
      default = { };
      example = lib.literalExpression ''
        {
          server_names = [ "mcp.example.org" ];
          public_url = "https://mcp.example.org:8443";
          orders.cooldown_sec = 600;
        }
      '';
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        options = {
          state_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/${cfg.user}";
            defaultText = lib.literalExpression ''"/var/lib/''${config.services.mcp-server.user}"'';
            description = "Database (SQLite), local archive, enrollment CA and order key (unless given as files).";
          };
          agent_listen = lib.mkOption {
            type = lib.types.str;
            default = "0.0.0.0:8443";
            example = "[::]:8443";
            description = "The agent listener (mTLS, protocol v1; enrollment without a certificate).";
          };
          operator_listen = lib.mkOption {
            type = lib.types.str;
            # Operators reach it through SSH or a reverse proxy unless opened on purpose.
            default = "127.0.0.1:9443";
            example = "0.0.0.0:9443";
            description = "The operator listener (HTTPS API with bearer tokens, /api/v1/openapi.json).";
          };
          server_names = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ config.networking.hostName ];
            defaultText = lib.literalExpression "[ config.networking.hostName ]";
            example = [
              "mcp.example.org"
              "192.0.2.10"
            ];
            description = "DNS names and addresses in the server certificate the CA makes on first start (when no tls.certFile is given).";
          };
          archive_retention_days = lib.mkOption {
            type = lib.types.ints.positive;
            # HIPAA 164.316(b)(2)(i): six years.
            default = 2190;
            description = "Days each archived bundle is kept under Object Lock (COMPLIANCE mode).";
          };
        };
      };
    };

    allowedAddresses = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "10.20.0.0/16"
        "2001:db8::/48"
      ];
      description = ''
        Networks (IP or CIDR, or "any") the server may exchange packets with besides
        localhost: the boxes, the operators, a load balancer, a remote S3 endpoint.
        Everything else is dropped by the unit's IPAddressDeny=any.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the agent listener's port (and the operator listener's, when not on loopback).";
    };

    orderKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/secrets/mcp-server/order-signing.key";
      description = ''
        The Ed25519 order-signing key (PKCS#8 PEM), passed as a credential. Boxes pin
        its public key at enrollment. Default: made in state_dir on first start.
      '';
    };

    tls = {
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        example = "/var/lib/acme/mcp.example.org/fullchain.pem";
        description = "Both listeners' certificate chain. Default: issued by the enrollment CA on first start.";
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        example = "/var/lib/acme/mcp.example.org/key.pem";
        description = "The key of tls.certFile, passed as a credential.";
      };
    };

    clientCaFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/etc/mcp-server/box-ca.pem";
      description = "CA certificates box certificates must chain to. Default: the server's own enrollment CA.";
    };

    agentApiKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/secrets/mcp-server/agent-api-key";
      description = "When set, boxes must also send this bearer token (a second factor beside the certificate).";
    };

    database = lib.mkOption {
      type = lib.types.enum [
        "sqlite"
        "postgresql"
      ];
      default = "sqlite";
      example = "postgresql";
      description = ''
        `sqlite`: a file in state_dir (one machine). `postgresql`: a local
        services.postgresql with a database and role named after `user`, reached over
        its Unix socket by peer authentication; several server instances can share it.
      '';
    };

    archive = {
      backend = lib.mkOption {
        type = lib.types.enum [
          "local"
          "minio"
          "s3"
        ];
        default = "local";
        example = "minio";
        description = ''
          Where evidence bytes go. `local`: a directory in state_dir. `minio`: a local
          services.minio with a bucket made with Object Lock and a COMPLIANCE default
          retention of archive_retention_days. `s3`: any S3 endpoint with Object Lock.
        '';
      };
      s3 = {
        bucket = lib.mkOption {
          type = lib.types.str;
          default = "compliance-evidence";
          description = "The bucket; it must have Object Lock (the server refuses to start otherwise).";
        };
        endpoint = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          example = "https://s3.eu-central-1.amazonaws.com";
          description = "The S3 endpoint (backend `s3`); null: AWS S3 of `region`.";
        };
        region = lib.mkOption {
          type = lib.types.str;
          default = "us-east-1";
          description = "The bucket's region (MinIO accepts us-east-1).";
        };
        forcePathStyle = lib.mkOption {
          type = lib.types.bool;
          default = false;
          description = "Put the bucket in the path rather than the host name.";
        };
        accessKeyId = lib.mkOption {
          type = lib.types.str;
          default = "mcp-server";
          description = "The server's S3 access key id (with `minio`: the user made for it).";
        };
        secretAccessKeyFile = lib.mkOption {
          type = lib.types.nullOr lib.types.path;
          default = null;
          example = "/run/secrets/mcp-server/s3-secret";
          description = "A file holding the S3 secret key (8 to 40 characters for MinIO), passed as a credential.";
        };
      };
      minio.rootCredentialsFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        example = "/run/secrets/minio-root";
        description = "MinIO's root credentials (MINIO_ROOT_USER=..., MINIO_ROOT_PASSWORD=...), used to make the bucket and the server's user.";
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
            message = "services.mcp-server.tls.certFile and tls.keyFile go together: set both or neither.";
          }
          {
            assertion = cfg.archive.backend == "local" || cfg.archive.s3.secretAccessKeyFile != null;
            message = "services.mcp-server.archive.backend = \"${cfg.archive.backend}\" needs archive.s3.secretAccessKeyFile (a file with the S3 secret key).";
          }
          {
            assertion = cfg.archive.backend != "minio" || cfg.archive.minio.rootCredentialsFile != null;
            message = "services.mcp-server.archive.backend = \"minio\" needs archive.minio.rootCredentialsFile (MINIO_ROOT_USER and MINIO_ROOT_PASSWORD) to make the locked bucket.";
          }
          {
            assertion = cfg.settings.state_dir == "/var/lib/${cfg.user}";
            message = "services.mcp-server.settings.state_dir must stay /var/lib/${cfg.user}: the unit's StateDirectory is the only directory it may write.";
          }
        ];

        users.users.${cfg.user} = {
          isSystemUser = true;
          group = cfg.user;
          description = "MSP central server";
        };
        users.groups.${cfg.user} = { };

        environment.systemPackages = [ admin ];
        environment.etc."mcp-server/config.toml".source = configFile;

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (
          [ (port cfg.settings.agent_listen) ]
          ++ lib.optional (!lib.hasPrefix "127." cfg.settings.operator_listen) (port cfg.settings.operator_listen)
        );

        systemd.services.mcp-server = {
          description = "MSP central server for compliance appliances";
          wantedBy = [ "multi-user.target" ];
          after = [ "network-online.target" ];
          wants = [ "network-online.target" ];
          restartTriggers = [ configFile ];
          environment.RUST_LOG = lib.mkDefault "info";
          serviceConfig = hardening // {
            # A static user (not DynamicUser) so mcp-server-admin can act as it.
            DynamicUser = false;
            ExecStart = "${lib.getExe cfg.package} --config ${configFile} serve";
            LoadCredential = loadCredential;
            Restart = "on-failure";
            RestartSec = 5;
          };
        };
      }

      (lib.mkIf cfg.monitoring.prometheus.enable {
        assertions = [
          {
            assertion =
              cfg.monitoring.prometheus.tokenFile != null
              || (cfg.settings.metrics.access or "token") == "loopback";
            message = "services.mcp-server.monitoring.prometheus needs tokenFile (an operator token Prometheus sends), or settings.metrics.access = \"loopback\" with operator_listen on loopback.";
          }
          {
            assertion = (cfg.settings.metrics.access or "token") != "off";
            message = "services.mcp-server.monitoring.prometheus scrapes /metrics, but settings.metrics.access = \"off\" serves none: drop one of the two.";
          }
        ];
        services.prometheus = {
          enable = lib.mkDefault true;
          scrapeConfigs = [
            (
              {
                job_name = "mcp-server";
                scheme = "https";
                metrics_path = "/metrics";
                scrape_interval = cfg.monitoring.prometheus.scrapeInterval;
                tls_config = {
                  ca_file = cfg.monitoring.prometheus.caFile;
                  server_name = cfg.monitoring.prometheus.serverName;
                };
                static_configs = [ { targets = [ scrapeTarget ]; } ];
              }
              // lib.optionalAttrs (cfg.monitoring.prometheus.tokenFile != null) {
                authorization = {
                  type = "Bearer";
                  credentials_file = cfg.monitoring.prometheus.tokenFile;
                };
              }
            )
          ];
        };
      })

      (lib.mkIf cfg.monitoring.grafana.enable {
        services.grafana = {
          enable = lib.mkDefault true;
          provision = {
            enable = true;
            dashboards.settings.providers = [
              {
                name = "mcp-server";
                type = "file";
                # Read-only: the dashboard is the one in this repository.
                disableDeletion = true;
                allowUiUpdates = false;
                options.path = dashboards;
              }
            ];
          };
        };
      })

      (lib.mkIf (cfg.database == "postgresql") {
        services.postgresql = {
          enable = true;
          ensureDatabases = [ cfg.user ];
          ensureUsers = [
            {
              name = cfg.user;
              ensureDBOwnership = true;
            }
          ];
        };
        # postgresql.target is reached once the server runs and ensureDatabases and
        # ensureUsers are applied (postgresql-setup.service, nixpkgs 25.11); the unit
        # needs its role and database, not only a listening server.
        systemd.services.mcp-server = {
          after = [ "postgresql.target" ];
          requires = [ "postgresql.target" ];
        };
      })

      (lib.mkIf (cfg.archive.backend == "minio") {
        services.minio = {
          enable = true;
          # Only the server talks to it.
          listenAddress = "127.0.0.1:9000";
          consoleAddress = "127.0.0.1:9001";
          rootCredentialsFile = cfg.archive.minio.rootCredentialsFile;
        };
        # The bucket with Object Lock (which enables versioning) and a COMPLIANCE
        # default retention, and the server's own user; idempotent.
        systemd.services.mcp-server-minio-bucket = {
          description = "Locked evidence bucket for mcp-server";
          after = [ "minio.service" ];
          requires = [ "minio.service" ];
          before = [ "mcp-server.service" ];
          requiredBy = [ "mcp-server.service" ];
          path = [ pkgs.minio-client ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            EnvironmentFile = cfg.archive.minio.rootCredentialsFile;
            LoadCredential = lib.optional (
              cfg.archive.s3.secretAccessKeyFile != null
            ) "s3-secret:${cfg.archive.s3.secretAccessKeyFile}";
            # mc keeps its alias file here.
            RuntimeDirectory = "mcp-server-minio-bucket";
            Environment = "HOME=/run/mcp-server-minio-bucket";
          };
          script = ''
            set -eu
            for i in $(seq 60); do
              mc alias set local http://127.0.0.1:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1 && break
              sleep 1
            done
            mc mb --ignore-existing --with-lock local/${cfg.archive.s3.bucket}
            mc retention set --default compliance ${toString cfg.settings.archive_retention_days}d local/${cfg.archive.s3.bucket}
            mc admin user add local ${cfg.archive.s3.accessKeyId} "$(cat "$CREDENTIALS_DIRECTORY/s3-secret")"
            mc admin policy attach local readwrite --user ${cfg.archive.s3.accessKeyId} || true
          '';
        };
      })
    ]
  );
}
