# VM test: the agent starts hardened. The live unit scores within the limit in
# `systemd-analyze security`, and the running process has NoNewPrivs set and
# no capabilities. Negative: the same probes flag an unhardened root service.
{ ... }:
{
  name = "agent-hardened";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ ./lib/agent-node.nix ];
      # Negative control: what the probes must reject.
      systemd.services.unhardened-probe = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig.ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
      };
    };

  testScript = ''
    import re

    LIMIT = 1.5

    def exposure(unit):
        out = machine.succeed(f"systemd-analyze security --no-pager {unit} 2>&1")
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert m, f"expected an exposure figure for {unit}, got {out}"
        return float(m.group(1))

    def status_of(unit):
        pid = machine.succeed(f"systemctl show -P MainPID {unit}").strip()
        assert pid not in ("", "0"), f"expected {unit} to have a main PID, got {pid!r}"
        return machine.succeed(f"cat /proc/{pid}/status")

    def field(status, name):
        m = re.search(rf"^{name}:\s+(\S+)", status, re.M)
        assert m, f"expected {name} in /proc status, got {status}"
        return m.group(1)

    start_all()
    machine.wait_for_unit("compliance-agent.service")
    machine.wait_for_unit("unhardened-probe.service")

    with subtest("the live unit scores within the limit"):
        figure = exposure("compliance-agent.service")
        print(f"compliance-agent.service exposure: {figure}")
        assert figure <= LIMIT, f"expected exposure <= {LIMIT}, got {figure}"

    with subtest("the process has NoNewPrivs and no capabilities"):
        st = status_of("compliance-agent.service")
        assert field(st, "NoNewPrivs") == "1", f"expected NoNewPrivs 1, got {field(st, 'NoNewPrivs')}"
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(field(st, cap), 16) == 0, f"expected {cap} 0, got {field(st, cap)}"
        uid = field(st, "Uid")
        assert uid != "0", f"expected a non-root uid, got {uid}"

    with subtest("negative: the probes flag an unhardened root service"):
        figure = exposure("unhardened-probe.service")
        assert figure > LIMIT, f"expected the unhardened unit above {LIMIT}, got {figure}"
        st = status_of("unhardened-probe.service")
        assert field(st, "NoNewPrivs") == "0", f"expected NoNewPrivs 0 on the probe, got {field(st, 'NoNewPrivs')}"
        assert int(field(st, "CapEff"), 16) != 0, f"expected capabilities on the probe, got {field(st, 'CapEff')}"

    with subtest("the agent cannot reach beyond its sandbox"):
        machine.fail("runuser -u compliance-agent -- systemctl stop auditd.service")
        machine.fail("runuser -u compliance-agent -- systemctl stop nftables.service")
  '';
}
