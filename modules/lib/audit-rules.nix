# HIPAA-oriented audit rules (45 CFR 164.312(b), audit controls), as the list
# of auditctl lines that security.audit.rules takes.
#
# Pure (builtins only). The NixOS audit module adds the control lines itself
# (-D, -b, -f, -e), so this list holds only watches (-w) and syscall rules
# (-a). tests/nix/check.sh checks every line's structure. The directories
# these rules need when they load are made by ./audit-directories.nix.
{
  # The agent's state directory (queue, chain head) and evidence directory.
  stateDir ? "/var/lib/compliance-agent",
  evidenceDir ? "${stateDir}/evidence",
  # Files holding the agent's keys on the host (read access is audited).
  # Files under /run are left out: /run is rebuilt at every boot and sops-nix
  # re-points /run/secrets at every activation, which silently drops a watch
  # placed through the old path.
  secretFiles ? [ ],
  # Syscall ABIs to cover: [ "b64" "b32" ] on x86_64, [ "b64" ] on aarch64.
  arches ? [ "b64" ],
  # Lowest uid of a human login (auid filter of the privileged-command rules).
  minLoginUid ? 1000,
}:
let
  inherit (builtins)
    concatLists
    concatStringsSep
    filter
    map
    match
    toJSON
    ;
  isAbsolute = p: match "/[A-Za-z0-9_./@+-]*" p != null;
  badPaths = filter (p: !(isAbsolute p)) ([ stateDir evidenceDir ] ++ secretFiles);
  watchedSecrets = filter (f: match "/run/.*" f == null) secretFiles;
  badArches = filter (a: a != "b64" && a != "b32") arches;
  unsetAuid = "4294967295";
  human = "-F auid>=${toString minLoginUid} -F auid!=${unsetAuid}";

  watch = path: perms: key: "-w ${path} -p ${perms} -k ${key}";
  perArch = f: map f arches;

  identity = map (f: watch f "wa" "identity") [
    "/etc/passwd"
    "/etc/shadow"
    "/etc/group"
    "/etc/gshadow"
    "/etc/subuid"
    "/etc/subgid"
    "/etc/sudoers"
    "/etc/sudoers.d"
  ];

  logins = map (f: watch f "wa" "logins") [
    "/var/log/lastlog"
    "/var/log/wtmp"
    "/var/log/btmp"
    "/var/run/faillock"
  ];

  # chronyd slews the clock with adjtimex all the time; only human-initiated
  # adjtimex calls are recorded, while settimeofday/clock_settime (steps) are
  # recorded from everyone.
  timeChange =
    perArch (a: "-a always,exit -F arch=${a} -S settimeofday,clock_settime -k time-change")
    ++ perArch (a: "-a always,exit -F arch=${a} -S adjtimex ${human} -k time-change")
    ++ [
      (watch "/etc/localtime" "wa" "time-change")
      (watch "/etc/chrony.conf" "wa" "time-change")
    ];

  # Privileged commands by what they do, not by where the wrapper lives: a
  # watch on /run/wrappers/bin/<wrapper> would be dropped whenever
  # suid-sgid-wrappers.service re-points /run/wrappers (every activation).
  # Recorded: any program that gains root or the root group through
  # setuid/setgid, and every command a logged-in person runs as root
  # (sudo, su, a root shell), as the usual STIG rules do.
  privileged =
    perArch (a: "-a always,exit -F arch=${a} -S execve -C uid!=euid -F euid=0 -k privileged")
    ++ perArch (a: "-a always,exit -F arch=${a} -S execve -C gid!=egid -F egid=0 -k privileged")
    ++ perArch (a: "-a always,exit -F arch=${a} -S execve -F euid=0 ${human} -k privileged");

  system = [
    (watch "/etc/ssh/sshd_config" "wa" "sshd-config")
    (watch "/etc/audit" "wa" "audit-config")
    (watch "/var/log/audit" "wa" "audit-log")
    (watch "/etc/nixos" "wa" "system-config")
    (watch "/nix/var/nix/profiles" "wa" "system-generation")
  ]
  ++ perArch (a: "-a always,exit -F arch=${a} -S init_module,finit_module,delete_module -k kernel-modules");

  agent = [
    # Evidence: every write or attribute change, whoever makes it.
    (watch evidenceDir "wa" "compliance-evidence")
    # State: the agent writes it constantly; record people, not the agent.
    "-a always,exit -F dir=${stateDir} -F perm=wa ${human} -k compliance-state"
  ]
  ++ map (f: watch f "rwa" "compliance-keys") watchedSecrets;

  rules = concatLists [
    identity
    logins
    timeChange
    privileged
    system
    agent
  ];
in
if badPaths != [ ] then
  throw "audit-rules: paths must be absolute and free of spaces and quotes: ${toJSON badPaths}"
else if badArches != [ ] || arches == [ ] then
  throw "audit-rules: arches must be a non-empty list of \"b64\"/\"b32\", got ${toJSON arches}"
else
  rules
