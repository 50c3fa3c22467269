# VM test: the central server as an MSP runs it (nixosModules.mcp-server with
# its embedded defaults: SQLite, the local archive, its own enrollment CA) and
# two boxes that enroll with one-time tokens. Evidence from both is delivered
# and archived with a six-year retain-until; an order runs on box A and its
# result reaches the server. Negative: box A's certificate is refused on box B's
# routes (and the refusal is in the audit log), and a used token enrolls nothing.
{ ... }:
let
  enrolled = "/var/lib/compliance-agent-keys/mcp";
  box =
    site: host:
    { config, ... }:
    {
      imports = [ ./lib/agent-node.nix ];
      # `compliance-agent enroll` is run by hand, with its own small config.
      environment.systemPackages = [ config.services.compliance-agent.package ];
      services.compliance-agent = {
        siteId = site;
        hostId = host;
        # What `compliance-agent enroll` writes (state_dir/mcp of its config).
        mcp = {
          caCertFile = "${enrolled}/ca.pem";
          clientCertFile = "${enrolled}/client.pem";
          clientKeyFile = "${enrolled}/client.key";
          orderPublicKeyFile = "${enrolled}/order-signing.pub.pem";
        };
      };
    };
in
{
  name = "central-server";

  nodes = {
    mcp =
      { pkgs, fixtures, ... }:
      {
        imports = [ ../modules/mcp-server.nix ];
        services.mcp-server = {
          enable = true;
          package = fixtures.mcpServer;
          openFirewall = true;
          allowedAddresses = [ "192.168.1.0/24" ];
          settings.server_names = [ "mcp" ];
        };
        environment.systemPackages = [ pkgs.jq ];
      };
    boxa = box "site-a" "box-a";
    boxb = box "site-b" "box-b";
  };

  testScript = ''
      import datetime
      import json

      AGENT = "compliance-agent"
      ENROLLED = "${enrolled}"

      def enroll_config(box, site, host):
          box.succeed(
              "cat > /tmp/enroll.toml <<'EOF'\n"
              f'site_id = "{site}"\nhost_id = "{host}"\n'
              'signing_key_file = "/var/lib/compliance-agent-keys/signing.key"\n'
              'state_dir = "/var/lib/compliance-agent-keys"\n'
              "EOF"
          )

      def enroll(box, site, host, token):
          enroll_config(box, site, host)
          box.succeed(f"{AGENT} --config /tmp/enroll.toml enroll --server https://mcp:8443 --token {token}")
          box.succeed("systemctl reset-failed compliance-agent.service; systemctl restart compliance-agent.service")
          box.wait_for_unit("compliance-agent.service")

      def token(site):
          return mcp.succeed(f"mcp-server-admin token create --site {site} 2>/dev/null").strip()

      def status_of(box, path):
          return box.succeed(
              f"curl --silent --output /dev/null --write-out '%{{http_code}}' --cacert {ENROLLED}/ca.pem"
              f" --cert {ENROLLED}/client.pem --key {ENROLLED}/client.key https://mcp:8443{path}"
          ).strip()

      start_all()
      mcp.wait_for_unit("mcp-server.service")
      mcp.wait_for_open_port(8443)
      for b in (boxa, boxb):
          b.wait_for_unit("compliance-agent-test-enrol.service")

      with subtest("both boxes enroll with one-time tokens"):
          token_a = token("site-a")
          assert token_a.startswith("mcpe1_"), f"expected an enrollment token, got {token_a!r}"
          enroll(boxa, "site-a", "box-a", token_a)
          enroll(boxb, "site-b", "box-b", token("site-b"))
          hosts = json.loads(mcp.succeed("mcp-server-admin hosts list --json"))["hosts"]
          names = sorted(f"{h['site_id']}/{h['host_id']}" for h in hosts)
          assert names == ["site-a/box-a", "site-b/box-b"], f"expected both boxes enrolled, got {names}"

      with subtest("negative: a used token enrolls nothing"):
          enroll_config(boxb, "site-a", "box-c")
          out = boxb.fail(f"{AGENT} --config /tmp/enroll.toml enroll --server https://mcp:8443 --token {token_a} 2>&1")
          assert "used up" in out, f"expected the reused token to be refused as used up, got {out}"

      with subtest("evidence from both boxes is delivered and archived with retention"):
          for host in ("site-a/box-a", "site-b/box-b"):
              mcp.wait_until_succeeds(
                  f"mcp-server-admin evidence list --host {host} --json | jq -e '.bundles | length > 0'", timeout=300
              )
          for host in ("box-a", "box-b"):
              found = mcp.succeed(
                  f"find /var/lib/mcp-server/archive -path '*/{host}/*' -name retain-until | head -1"
              ).strip()
              assert found, f"expected archived bundles of {host} with a retain-until"
              until = mcp.succeed(f"cat {found}").strip()
              years = int(until[:4]) - datetime.date.today().year
              assert years >= 5, f"expected about six years of retention for {host}, got retain-until {until}"

      with subtest("negative: box A's certificate is refused on box B's routes"):
          own = status_of(boxa, "/api/v1/hosts/site-a/box-a/orders")
          assert own == "200", f"expected box A to list its own orders, got HTTP {own}"
          other = status_of(boxa, "/api/v1/hosts/site-b/box-b/orders")
          assert other == "403", f"expected box A refused on box B's orders, got HTTP {other}"
          audit = json.loads(mcp.succeed("mcp-server-admin audit --limit 200 --json"))["audit"]
          refused = [e for e in audit if e["outcome"] == "refused" and e["target"] == "site-b/box-b"]
          assert refused, f"expected the refusal in the audit log, got {audit[:5]}"

      with subtest("an order runs on box A and its result reaches the server"):
          order_id = mcp.succeed(
              "mcp-server-admin order create --host site-a/box-a --runbook collect_evidence"
          ).split()[0]
          mcp.wait_until_succeeds(
              "mcp-server-admin order list --host site-a/box-a --json"
              f" | jq -e '.orders | map(select(.order_id == \"{order_id}\" and .result_outcome == \"success\")) | length == 1'",
              timeout=180,
          )
    '';
}
