# The baseline document (schema v1, docs/baseline.md) the agent checks the host
# against. modules/compliance-agent.nix gathers the facts from the host's own
# NixOS configuration and calls this function; the result is written to the
# store as JSON, so the flake is the baseline.
#
# Pure (builtins only). A check whose argument is null is left out of
# "checks": it does not apply to the host.
{
  policyVersion,
  # [ { name; active; enabled; } ]
  units ? [ ],
  patching ? null,
  avHealth ? null,
  backup ? null,
  logging ? null,
  firewall ? null,
  encryption ? null,
  timeSync ? null,
}:
let
  inherit (builtins)
    all
    attrNames
    filter
    isAttrs
    isBool
    isInt
    isList
    isString
    listToAttrs
    map
    match
    toJSON
    ;

  unitName = n: isString n && match "[A-Za-z0-9:_.@\\\\-]+\\.(service|socket|timer|target|path|mount|swap)" n != null;
  badUnits = filter (u: !(isAttrs u && unitName (u.name or null) && isBool (u.active or null) && isBool (u.enabled or null))) units;

  # Required keys and their type predicates, per check.
  nullOrString = v: v == null || isString v;
  nullOrInt = v: v == null || isInt v;
  listOf = p: v: isList v && all p v;
  schema = {
    patching = {
      system_profile = isString;
      target_system = nullOrString;
      target_revision = nullOrString;
      max_generation_age_days = isInt;
    };
    av_health = {
      units = listOf unitName;
      clamd_socket = isString;
      database_dir = isString;
      max_signature_age_hours = isInt;
      eicar_test = isBool;
    };
    backup = {
      tool = v: v == "restic";
      repository = isString;
      password_file = isString;
      unit = unitName;
      max_snapshot_age_hours = isInt;
      restore_test_unit = v: v == null || unitName v;
      max_restore_test_age_days = nullOrInt;
    };
    logging = {
      journald_persistent = isBool;
      journald_max_retention_sec = isInt;
      auditd = isBool;
      audit_rules = listOf isString;
      audit_rules_export_file = nullOrString;
      audit_rules_export_unit = v: v == null || unitName v;
    };
    firewall = {
      unit = unitName;
      ruleset_file = nullOrString;
      egress_policy = v: v == "drop" || v == "accept";
      ruleset_export_unit = v: v == null || unitName v;
      ruleset_export_file = nullOrString;
      expected_export_file = nullOrString;
    };
    encryption = {
      filesystems = listOf isString;
      swap = isBool;
      allowed_ciphers = listOf isString;
      min_key_bits = isInt;
    };
    time_sync = {
      unit = unitName;
      servers = listOf isString;
      max_offset_ms = isInt;
      max_stratum = isInt;
    };
  };

  given = {
    inherit
      patching
      backup
      logging
      firewall
      encryption
      ;
    av_health = avHealth;
    time_sync = timeSync;
  };
  present = filter (c: given.${c} != null) (attrNames given);

  checkErrors =
    c:
    let
      value = given.${c};
      keys = schema.${c};
    in
    if !(isAttrs value) then
      [ "${c} must be an attribute set or null" ]
    else
      map (k: "${c}.${k} is missing or has the wrong type (got ${toJSON (value.${k} or "<missing>")})") (
        filter (k: !(value ? ${k}) || !(keys.${k} value.${k})) (attrNames keys)
      )
      ++ map (k: "${c}.${k} is not a key of schema v1") (filter (k: !(keys ? ${k})) (attrNames value));

  errors =
    (if isString policyVersion && policyVersion != "" then [ ] else [ "policyVersion must be a non-empty string" ])
    ++ map (u: "unit entry ${toJSON u} needs name (a unit name), active and enabled (booleans)") badUnits
    ++ builtins.concatLists (map checkErrors present);
in
if errors != [ ] then
  throw ("baseline: invalid input:\n  " + builtins.concatStringsSep "\n  " errors)
else
  {
    version = 1;
    policy_version = policyVersion;
    inherit units;
    checks = listToAttrs (
      map (c: {
        name = c;
        value = given.${c};
      }) present
    );
  }
