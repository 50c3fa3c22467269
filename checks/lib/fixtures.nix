# Test-only fixtures for the VM tests: a throwaway PKI for the MCP's mTLS (a CA,
# the MCP's server certificate, the agent's client certificate naming
# test-site/machine as the central server reads it, and a client certificate
# from a rogue CA for the negative tests) and the MCP's Ed25519 order-signing
# key. Made at build time; never used outside checks/. (The central-server test
# uses none of it: there the server's own CA enrolls the boxes by token.)
{ pkgs, self }:
{
  pki =
    pkgs.runCommand "compliance-test-pki-DO-NOT-USE" { nativeBuildInputs = [ pkgs.openssl ]; }
      ''
        mkdir -p $out
        cd $out
        ec() { openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "$@"; }

        ec -x509 -days 3650 -keyout ca.key -out ca.pem -subj "/CN=test MCP CA"
        ec -x509 -days 3650 -keyout rogue-ca.key -out rogue-ca.pem -subj "/CN=rogue CA"

        printf 'subjectAltName=DNS:mcp,IP:192.168.1.2\nextendedKeyUsage=serverAuth\n' > server.ext
        ec -keyout server.key -out server.csr -subj "/CN=mcp"
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 -extfile server.ext -out server.pem

        printf 'extendedKeyUsage=clientAuth\n' > client.ext
        ec -keyout client.key -out client.csr -subj "/CN=test-site\/machine"
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out client.pem
        ec -keyout rogue.key -out rogue.csr -subj "/CN=test-site\/machine"
        openssl x509 -req -in rogue.csr -CA rogue-ca.pem -CAkey rogue-ca.key -CAcreateserial -days 3650 -extfile client.ext -out rogue.pem

        openssl genpkey -algorithm ed25519 -out order-signing.key
        openssl pkey -in order-signing.key -pubout -out order-signing.pub.pem
        chmod 0644 *
      '';

  mcpServer = self.packages.${pkgs.stdenv.hostPlatform.system}.mcp-server;
}
