# The central server's (mcp-server) systemd sandbox, as a serviceConfig attribute set.
#
# Pure (builtins only): modules/mcp-server.nix merges this into
# systemd.services.mcp-server.serviceConfig, and tests/nix/check.sh renders the
# same attribute set into a unit file and scores it with
# `systemd-analyze security --offline=true` (limit 1.5). What is scored is what ships.
#
# Starts from harmonia's serviceConfig; every loosening is commented. The server
# needs no privilege at all: its listeners are on unprivileged ports (8443, 9443),
# its state is one directory, and its secrets arrive as credentials.
{
  # The user name; also the PostgreSQL role it connects as by peer authentication.
  user ? "mcp-server",
  # Directory name under /var/lib (database, local archive, CA, order key).
  stateDirectory ? "mcp-server",
  # Addresses (IP or CIDR) that may talk to the server besides localhost: the boxes'
  # networks, the operators', a load balancer, and the S3 endpoint when remote.
  allowedAddresses ? [ ],
  # Absolute paths outside the state directory the server writes (none by default).
  readWritePaths ? [ ],
}:
let
  isAbsolute = p: builtins.isString p && builtins.substring 0 1 p == "/";
  badPaths = builtins.filter (p: !(isAbsolute p)) readWritePaths;
  addressPattern = "[0-9A-Fa-f.:]+(/[0-9]+)?|any";
  badAddresses = builtins.filter (a: builtins.match addressPattern a == null) allowedAddresses;
  namePattern = "[a-z_][a-z0-9_-]*";
in
if builtins.match namePattern user == null then
  throw "mcp-server-hardening: user '${user}' is not a valid system user name"
else if badPaths != [ ] then
  throw "mcp-server-hardening: readWritePaths must be absolute paths, got: ${builtins.toJSON badPaths}"
else if badAddresses != [ ] then
  throw "mcp-server-hardening: allowedAddresses must be IP addresses, CIDR prefixes or \"any\" (IPAddressAllow= takes no host names), got: ${builtins.toJSON badAddresses}"
else
  import ./sandbox.nix { inherit readWritePaths allowedAddresses; }
  // {
    # Identity: a dynamic user with a fixed name. Nothing outside the state
    # directory belongs to it, and PostgreSQL's peer authentication sees the name.
    DynamicUser = true;
    User = user;
    Group = user;

    # Keys, the CA, the database and the archive are private to the server.
    StateDirectory = stateDirectory;
    StateDirectoryMode = "0700";

    # Only its own processes in /proc: the server reads nothing else there.
    ProcSubset = "pid";

    # Its TCP/IP is both listeners and the S3 endpoint; AF_UNIX the journal
    # and PostgreSQL's socket. Many boxes hold a connection each (the server
    # caps them itself).
    LimitNOFILE = 65536;
  }
