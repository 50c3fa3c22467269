# The directories the kernel needs when the audit rules load, as
# systemd-tmpfiles lines.
#
# The kernel refuses a watch (-w PATH, -F path=PATH) whose parent directory
# does not exist, and a tree rule (-F dir=PATH) whose directory does not
# exist; `auditctl -R` stops at the first refused line, so every later rule
# and the final `-e` are never loaded. NixOS loads the rules
# (audit-rules-nixos.service) before sysinit.target, long before the
# services that would create their state directories, so every directory a
# rule needs is created here by systemd-tmpfiles-setup.service, which
# modules/hardening.nix orders the rule loading after.
#
# Pure (builtins only). tests/nix/check.sh derives the needed directories
# from the rules on its own and checks that this function covers them.
{
  # The auditctl lines (-w and -a rules) to be loaded.
  rules,
  # "MODE USER GROUP" for directories a service owns, e.g.
  # { "/var/lib/compliance-agent" = "0750 compliance-agent compliance-agent"; }.
  # Others get "- - -": created 0755 root if missing, left as they are if not.
  owners ? { },
  # Directories that exist before systemd-tmpfiles-setup.service runs on
  # NixOS; never listed (/var/run is a symlink tmpfiles must not touch).
  present ? [
    "/"
    "/etc"
    "/run"
    "/var/run"
    "/nix/var/nix"
  ],
}:
let
  inherit (builtins)
    concatLists
    concatMap
    elem
    elemAt
    filter
    foldl'
    isString
    length
    map
    match
    split
    toJSON
    ;
  words = rule: filter (w: isString w && w != "") (split " " rule);
  field = name: w: match "${name}=(.*)" w;
  needed =
    rule:
    let
      ws = words rule;
    in
    if length ws >= 2 && elemAt ws 0 == "-w" then
      [ (dirOf (elemAt ws 1)) ]
    else
      concatLists (
        map (
          w:
          if field "dir" w != null then
            field "dir" w
          else if field "path" w != null then
            [ (dirOf (elemAt (field "path" w) 0)) ]
          else
            [ ]
        ) ws
      );
  unique = foldl' (acc: d: if elem d acc then acc else acc ++ [ d ]) [ ];
  directories = filter (d: !(elem d present)) (unique (concatMap needed rules));
  relative = filter (d: match "/[A-Za-z0-9_./@+-]*" d == null) directories;
in
if relative != [ ] then
  throw "audit-directories: rules name directories that are not absolute clean paths: ${toJSON relative}"
else
  map (d: "d ${d} ${owners.${d} or "- - -"} -") directories
