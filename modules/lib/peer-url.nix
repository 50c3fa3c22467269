# The address and port of a peer named by URL (a signature mirror, a binary
# cache), for the egress allowlist: the firewall matches addresses, so the
# host must be an IPv4 address or a bracketed IPv6 address, never a name.
#
# Pure (builtins only): peer-url "http://198.51.100.30:8080/clamav" gives
# { scheme = "http"; address = "198.51.100.30"; port = 8080; }. The port
# defaults to the scheme's (80, 443). tests/nix/check.sh evaluates good and
# bad URLs.
url:
let
  inherit (builtins) fromJSON isString match elemAt;
  parts = if isString url then match "(https?)://([[]([0-9A-Fa-f:.]+)[]]|([0-9]{1,3}(\\.[0-9]{1,3}){3}))(:([0-9]{1,5}))?(/[A-Za-z0-9._~/-]*)?" url else null;
  scheme = elemAt parts 0;
  address = if elemAt parts 2 != null then elemAt parts 2 else elemAt parts 3;
  octetsOk = match "(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}" address != null;
  portText = elemAt parts 6;
  port =
    if portText != null then
      fromJSON (if match "0*([0-9]+)" portText != null then elemAt (match "0*([0-9]+)" portText) 0 else portText)
    else if scheme == "https" then
      443
    else
      80;
in
if parts == null then
  throw "peer-url: '${toString url}' is not http(s)://ADDRESS[:PORT][/PATH] with an IP address (the egress firewall matches addresses, not names)"
else if elemAt parts 2 == null && !octetsOk then
  throw "peer-url: '${url}' has an IPv4 address with an octet above 255"
else if port < 1 || port > 65535 then
  throw "peer-url: '${url}' has port ${toString port}, outside 1..65535"
else
  {
    inherit scheme address port;
  }
