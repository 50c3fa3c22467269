# The compliance agent's systemd sandbox, as a serviceConfig attribute set.
#
# Pure (builtins only): the NixOS module merges this into
# systemd.services.compliance-agent.serviceConfig, and tests/nix/check.sh renders
# the same attribute set into a unit file and scores it with
# `systemd-analyze security --offline=true`. What is scored is what ships.
#
# Every loosening of the baseline (harmonia's serviceConfig) is commented with
# the agent feature that needs it. The agent keeps no capability at all:
# privileged work is done by root oneshot units it may start through polkit
# (see polkit-rule.nix), including the export of the live nftables ruleset,
# which would otherwise need CAP_NET_ADMIN.
{
  # Dedicated static system user; the polkit rule names it.
  user ? "compliance-agent",
  group ? user,
  # Directory name under /var/lib (state, SQLite queue, evidence).
  stateDirectory ? "compliance-agent",
  # Directory name under /run (scratch space, mode 0750).
  runtimeDirectory ? "compliance-agent",
  # Absolute paths outside the state directory the agent must write, for
  # example the node exporter's textfile collector directory.
  readWritePaths ? [ ],
  # Addresses (IP or CIDR) the agent may talk to besides localhost: the MCP,
  # and the backup target when the backup check lists snapshots itself.
  allowedAddresses ? [ ],
  # Groups whose sockets the agent reads (for example clamav's clamd socket).
  supplementaryGroups ? [ ],
}:
let
  isAbsolute = p: builtins.isString p && builtins.substring 0 1 p == "/";
  badPaths = builtins.filter (p: !(isAbsolute p)) readWritePaths;
  addressPattern = "[0-9A-Fa-f.:]+(/[0-9]+)?";
  badAddresses = builtins.filter (a: builtins.match addressPattern a == null) allowedAddresses;
  namePattern = "[a-z_][a-z0-9_-]*";
in
if builtins.match namePattern user == null then
  throw "service-hardening: user '${user}' is not a valid system user name"
else if badPaths != [ ] then
  throw "service-hardening: readWritePaths must be absolute paths, got: ${builtins.toJSON badPaths}"
else if badAddresses != [ ] then
  throw "service-hardening: allowedAddresses must be IP addresses or CIDR prefixes (IPAddressAllow= takes no host names), got: ${builtins.toJSON badAddresses}"
else
  import ./sandbox.nix { inherit readWritePaths allowedAddresses; }
  // {
    # Identity: a dedicated static user rather than DynamicUser, because the
    # polkit rule must name a stable user and the evidence must stay owned by
    # the same uid across restarts.
    User = user;
    Group = group;
    SupplementaryGroups = supplementaryGroups;

    # Evidence and keys are created private (the base's UMask 0077); the
    # evidence directory is read by root (auditors, exports), never by others.
    StateDirectory = stateDirectory;
    StateDirectoryMode = "0750";
    RuntimeDirectory = runtimeDirectory;
    RuntimeDirectoryMode = "0750";

    # What the base leaves for the agent's checks: read access to
    # /nix/var/nix/profiles, /run/current-system, /proc/self/mountinfo,
    # /proc/swaps and /sys/block (patching and encryption); ProcSubset stays
    # "all", as ProcSubset=pid would hide /proc/swaps. The MCP over mTLS and
    # chronyd's monitoring port on localhost (UDP 323) are its TCP/IP; the
    # system bus, the journal and the clamd socket its AF_UNIX. No AF_NETLINK:
    # the nftables ruleset is exported by a root oneshot instead.
  }
