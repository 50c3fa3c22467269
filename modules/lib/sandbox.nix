# The systemd sandbox every long-running service of the platform shares (the
# agent on the boxes, the central server): no privilege, a read-only system,
# private devices, /tmp, mounts and users, no kernel tunables, modules, logs
# or clock, address families for sockets and TCP/IP only, IP traffic to
# localhost and the listed addresses only, and the @system-service syscall set
# without @privileged and @resources. Starts from harmonia's serviceConfig.
#
# Pure (builtins only). service-hardening.nix (the agent) and
# mcp-server-hardening.nix (the central server) extend it with their identity
# and state and validate their inputs; each extension is scored offline by
# tests/nix/check.sh.
{
  # Absolute paths outside the service's state directory that it writes.
  readWritePaths ? [ ],
  # Addresses (IP or CIDR) the service may talk to besides localhost.
  allowedAddresses ? [ ],
}:
{
  # What the service creates is private to it.
  UMask = "0077";

  # Privileges: none, and no way to gain any.
  NoNewPrivileges = true;
  CapabilityBoundingSet = "";
  AmbientCapabilities = "";
  RestrictSUIDSGID = true;
  SecureBits = "noroot-locked";

  # File system: read-only except the service's own directories and the listed ones.
  ProtectSystem = "strict";
  ReadWritePaths = readWritePaths;
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  DevicePolicy = "closed";
  PrivateMounts = true;
  ProtectProc = "invisible";
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  ProtectClock = true;
  ProtectHostname = true;
  # Its own user namespace: uid 0 does not exist there. D-Bus, polkit and
  # PostgreSQL's peer authentication still see the real uid (the kernel
  # translates peer credentials).
  PrivateUsers = true;
  KeyringMode = "private";
  RemoveIPC = true;

  # Network: AF_UNIX (system bus, journal, local sockets) and TCP/IP; no
  # AF_NETLINK or AF_PACKET.
  RestrictAddressFamilies = [
    "AF_UNIX"
    "AF_INET"
    "AF_INET6"
  ];
  IPAddressDeny = "any";
  IPAddressAllow = [ "localhost" ] ++ allowedAddresses;

  # Kernel surface.
  RestrictNamespaces = true;
  LockPersonality = true;
  MemoryDenyWriteExecute = true;
  RestrictRealtime = true;
  SystemCallArchitectures = "native";
  SystemCallFilter = [
    "@system-service"
    "~@privileged"
    "~@resources"
  ];
  SystemCallErrorNumber = "EPERM";
}
