#!/usr/bin/env bash
# TLS for gpuscale without cert-manager: a CA and the scaler's serving
# certificate, made with openssl, as the Secret and ConfigMap the manifests
# mount.
#
#   deploy/scripts/self-signed-certs.sh OUT_DIR            # files only
#   deploy/scripts/self-signed-certs.sh OUT_DIR --apply    # and kubectl apply
#
# OUT_DIR gets ca.crt, ca.key (keep it safe, or delete it: it is needed only
# to issue the next serving certificate), tls.crt and tls.key (the scaler's,
# valid 90 days: run the script again with the same OUT_DIR before then;
# the CA is reused and the scaler reloads the new Secret without dropping
# streams). Optional: CLIENTS="keda-operator.keda.svc router" also issues a
# client certificate per name (<name>.crt, <name>.key) for mutual TLS.
set -euo pipefail
out="${1:?usage: $0 OUT_DIR [--apply]}"
apply="${2:-}"
ns="${NAMESPACE:-gpuscale-system}"
svc="gpuscale-scaler"
mkdir -p "$out"
cd "$out"
umask 077

if [ ! -f ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.crt -days 3650 -subj "/CN=gpuscale-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

leaf() { # name, extendedKeyUsage, subjectAltName
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=${4:-$1}" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' "$2" "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out "$1.crt" -days 90 -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

leaf tls serverAuth \
  "DNS:$svc,DNS:$svc.$ns,DNS:$svc.$ns.svc,DNS:$svc.$ns.svc.cluster.local,DNS:localhost,IP:127.0.0.1" "$svc.$ns.svc"
for name in ${CLIENTS:-}; do
  leaf "$name" clientAuth "DNS:$name"
done
echo "wrote $(pwd)/{ca.crt,tls.crt,tls.key}" >&2

if [ "$apply" = "--apply" ]; then
  kubectl -n "$ns" create secret tls gpuscale-scaler-tls --cert=tls.crt --key=tls.key \
    --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$ns" create configmap gpuscale-ca --from-file=ca.crt=ca.crt \
    --dry-run=client -o yaml | kubectl apply -f -
fi
