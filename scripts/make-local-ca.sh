#!/usr/bin/env bash
# Makes a local certificate authority and a server certificate for localhost (and 127.0.0.1,
# ::1) signed by it, for trying pgs's TLS without a public certificate:
#   DIR/ca.crt         the CA certificate: give it to clients (sslrootcert=DIR/ca.crt)
#   DIR/ca.key         the CA's key (mode 0600): keep it, or delete it once you are done
#   DIR/localhost.pem  certificate chain and key in one file, as HAProxy reads it (mode 0600):
#                      `pgs-agent init --tls-cert DIR/localhost.pem`
# Existing files are kept (run it again: nothing changes). Needs openssl.
#
#   scripts/make-local-ca.sh DIR [DAYS]
set -euo pipefail
dir=${1:?usage: $0 DIR [DAYS]}
days=${2:-825}
mkdir -p "$dir"
cd "$dir"
umask 077
if [ ! -f ca.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
        -keyout ca.key -out ca.crt -subj "/CN=pgs local CA $(hostname)" 2>/dev/null
    chmod 0644 ca.crt
fi
if [ ! -f localhost.pem ]; then
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout localhost.key -out localhost.csr -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n' > localhost.ext
    openssl x509 -req -in localhost.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$days" -extfile localhost.ext -out localhost.crt 2>/dev/null
    cat localhost.crt localhost.key > localhost.pem
    rm -f localhost.csr localhost.ext localhost.key localhost.crt ca.srl
fi
echo "make-local-ca: $dir/ca.crt (give to clients), $dir/localhost.pem (give to pgs-agent init --tls-cert)"
