# The option definitions a NixOS module makes (a file, or with `select` a node
# of a VM test file), as { definitions = [ { path, kind } ]; imports = [ base
# names ]; } without evaluating any option: kind is "default"/"force"
# (lib.mkDefault/mkForce), "list", "value" (a plain scalar or string), or
# "override" (another priority). tests/nix/check.sh uses it to find a value
# that a shared VM-test node profile sets at normal priority and a test sets
# again: a "conflicting definition values" error for every non-mergeable option.
#
# Modules are called with stub arguments made from the file's own text:
# every `pkgs.NAME` and `config.a.b.c` it mentions resolves to a stand-in.
{ file, select ? (m: m) }:
let
  inherit (builtins)
    attrNames
    concatLists
    concatMap
    elemAt
    filter
    foldl'
    isAttrs
    isFunction
    isList
    isString
    length
    listToAttrs
    map
    readFile
    split
    ;
  text = readFile file;
  captures = re: map (m: elemAt m 0) (filter isList (split re text));
  stub = name: {
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    name = name;
  };
  pkgs = listToAttrs (map (n: {
    name = n;
    value = stub n;
  }) (captures "pkgs\\.([A-Za-z0-9_-]+)"));
  setPath =
    set: path:
    if path == [ ] then
      set
    else
      let
        head = elemAt path 0;
        rest = builtins.tail path;
      in
      set // { ${head} = setPath (if set ? ${head} && isAttrs set.${head} then set.${head} else stub head) rest; };
  config = foldl' setPath { } (
    map (p: filter isString (split "\\." p)) (captures "config\\.([A-Za-z0-9_.-]*[A-Za-z0-9_-])")
  );
  lib = {
    mkDefault = content: {
      _type = "override";
      priority = 1000;
      inherit content;
    };
    mkForce = content: {
      _type = "override";
      priority = 50;
      inherit content;
    };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    getExe = p: "${p}/bin/${p.name or "stub"}";
    getExe' = p: n: "${p}/bin/${n}";
    concatStringsSep = builtins.concatStringsSep;
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
  };
  nodes = foldl' setPath { } (
    map (p: filter isString (split "\\." p)) (captures "nodes\\.([A-Za-z0-9_.-]*[A-Za-z0-9_-])")
  );
  fixtures = {
    pki = "/pki";
    mcpServer = stub "mcp-server";
  };
  args = {
    inherit config lib pkgs nodes fixtures;
    self = null;
    inputs = { };
    modulesPath = "/modules";
  };
  call = m: if isFunction m then m args else m;
  walk =
    path: v:
    if isAttrs v && v ? _type then
      if v._type == "if" then
        walk path v.content
      else
        [
          {
            inherit path;
            kind =
              if v.priority == 1000 then
                "default"
              else if v.priority == 50 then
                "force"
              else
                "override";
          }
        ]
    else if isAttrs v && !(v ? outPath) then
      concatMap (n: walk (path ++ [ n ]) v.${n}) (filter (n: n != "imports") (attrNames v))
    else
      [
        {
          inherit path;
          kind = if isList v then "list" else "value";
        }
      ];
  module = call (select (call (import file)));
in
{
  definitions = walk [ ] module;
  imports = map baseNameOf (module.imports or [ ]);
}
