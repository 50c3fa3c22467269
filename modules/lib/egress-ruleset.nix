# The appliance's nftables ruleset: default-drop in both directions, egress
# only to an allowlist (the MCP, NTP, DNS, the backup target, the update
# cache), inbound only to the ports the host opens, and every dropped packet
# logged (rate-limited) with a prefix the agent and auditors can grep for.
#
# Pure (builtins only) and returns the ruleset text: modules/hardening.nix
# writes it to the store for nftables.service, and tests/nix/check.sh checks
# the same text with `nft -c -f` and loads it in a network namespace.
# Input is validated strictly, because it is pasted into the ruleset.
{
  # Name of the inet table; the ruleset replaces only this table.
  tableName ? "compliance",
  # Egress allowlist: attribute set of name -> { addresses, proto, ports }.
  #   addresses: list of IPv4/IPv6 addresses or CIDR prefixes
  #   proto: "tcp" or "udp"
  #   ports: list of destination ports (1..65535), never empty
  egress ? { },
  # Inbound ports the host opens (from networking.firewall.allowed*Ports).
  inboundTcpPorts ? [ ],
  inboundUdpPorts ? [ ],
  # DHCPv4 client traffic (the lease comes before any allowlisted peer).
  allowDhcp ? true,
  # Answer ICMP echo (rate-limited).
  allowPing ? true,
  # Log prefixes of dropped packets, as seen in the journal (kernel facility).
  egressLogPrefix ? "compliance-egress-drop: ",
  inboundLogPrefix ? "compliance-inbound-drop: ",
  # Rate of drop log lines per minute, so a flood cannot fill the journal.
  logPerMinute ? 30,
}:
let
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    isInt
    isList
    isString
    length
    map
    match
    toJSON
    ;

  ipv4 = "([0-9]{1,3}\\.){3}[0-9]{1,3}(/[0-9]{1,2})?";
  ipv6 = "[0-9A-Fa-f]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?";
  isIPv4 = a: isString a && match ipv4 a != null;
  isIPv6 = a: isString a && match ipv6 a != null;
  validName = n: match "[A-Za-z0-9][A-Za-z0-9_.-]{0,62}" n != null;
  validPort = p: isInt p && p >= 1 && p <= 65535;
  validPrefix = s: isString s && match "[A-Za-z0-9 _:.-]{1,27}" s != null;

  entryErrors =
    name:
    let
      e = egress.${name};
      addresses = e.addresses or [ ];
      ports = e.ports or [ ];
      proto = e.proto or "tcp";
    in
    (if validName name then [ ] else [ "egress entry name '${name}' must match [A-Za-z0-9][A-Za-z0-9_.-]*" ])
    ++ (
      if isList addresses && addresses != [ ] then
        map (a: "egress.${name}: '${toString a}' is not an IP address or CIDR prefix") (
          filter (a: !(isIPv4 a || isIPv6 a)) addresses
        )
      else
        [ "egress.${name}: addresses must be a non-empty list" ]
    )
    ++ (if proto == "tcp" || proto == "udp" then [ ] else [ "egress.${name}: proto must be tcp or udp" ])
    ++ (
      if isList ports && ports != [ ] then
        map (p: "egress.${name}: port ${toJSON p} is not in 1..65535") (filter (p: !(validPort p)) ports)
      else
        [ "egress.${name}: ports must be a non-empty list (an allowlist entry without ports would allow everything)" ]
    );

  errors =
    (if match "[a-z][a-z0-9_]{0,30}" tableName != null then [ ] else [ "tableName must match [a-z][a-z0-9_]*" ])
    ++ builtins.concatLists (map entryErrors (attrNames egress))
    ++ map (p: "inbound TCP port ${toJSON p} is not in 1..65535") (filter (p: !(validPort p)) inboundTcpPorts)
    ++ map (p: "inbound UDP port ${toJSON p} is not in 1..65535") (filter (p: !(validPort p)) inboundUdpPorts)
    ++ (if validPrefix egressLogPrefix && validPrefix inboundLogPrefix then [ ] else [ "log prefixes must be 1-27 characters of [A-Za-z0-9 _:.-]" ])
    ++ (if isInt logPerMinute && logPerMinute > 0 then [ ] else [ "logPerMinute must be a positive integer" ]);

  set = items: if length items == 1 then toString (builtins.head items) else "{ ${concatStringsSep ", " (map toString items)} }";

  egressRules =
    name:
    let
      e = egress.${name};
      proto = e.proto or "tcp";
      v4 = filter isIPv4 e.addresses;
      v6 = filter isIPv6 e.addresses;
      rule = family: addrs: ''
        ${family} daddr ${set addrs} ${proto} dport ${set e.ports} accept comment "${name}"
      '';
    in
    (if v4 == [ ] then "" else rule "ip" v4) + (if v6 == [ ] then "" else rule "ip6" v6);

  indent = prefix: text: concatStringsSep "\n" (map (l: if l == "" then l else prefix + l) (filter isString (builtins.split "\n" text)));

  inboundRules =
    (if inboundTcpPorts == [ ] then "" else "tcp dport ${set inboundTcpPorts} accept\n")
    + (if inboundUdpPorts == [ ] then "" else "udp dport ${set inboundUdpPorts} accept\n");

  logDrop =
    prefix: level:
    "limit rate ${toString logPerMinute}/minute burst 10 packets log prefix \"${prefix}\" level ${level}\ncounter drop";
in
if errors != [ ] then
  throw ("egress-ruleset: invalid input:\n  " + concatStringsSep "\n  " errors)
else
  ''
    # nftables ruleset of the compliance appliance (modules/lib/egress-ruleset.nix).
    # Default drop both ways; egress allowlist: ${concatStringsSep ", " (attrNames egress)}.
    table inet ${tableName}
    delete table inet ${tableName}
    table inet ${tableName} {
      chain input {
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
        ct state invalid drop
        # IPv6 needs neighbour discovery and path MTU messages to work at all.
        icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept
        icmp type { destination-unreachable, time-exceeded, parameter-problem } accept
    ${indent "    " (
      (if allowPing then "icmp type echo-request limit rate 5/second accept\nicmpv6 type echo-request limit rate 5/second accept\n" else "")
      + (if allowDhcp then "udp sport 67 udp dport 68 accept comment \"dhcp\"\n" else "")
      + inboundRules
      + logDrop inboundLogPrefix "info"
    )}
      }

      chain forward {
        type filter hook forward priority filter; policy drop;
        counter drop
      }

      chain output {
        type filter hook output priority filter; policy drop;
        oifname "lo" accept
        ct state established,related accept
        ct state invalid drop
        icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report, packet-too-big } accept
    ${indent "    " (
      (if allowDhcp then "udp sport 68 udp dport 67 accept comment \"dhcp\"\n" else "")
      + concatStringsSep "" (map egressRules (attrNames egress))
      + logDrop egressLogPrefix "warn"
    )}
      }
    }
  ''
