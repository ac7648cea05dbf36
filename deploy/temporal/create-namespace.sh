#!/bin/sh
# Creates the namespace the workers use once the server answers, with its retention.
# Safe to run on every start: an existing namespace is left as it is.
#
# Environment: TEMPORAL_ADDRESS, DEFAULT_NAMESPACE (default "default"),
# DEFAULT_NAMESPACE_RETENTION (default 720h), NAMESPACE_TIMEOUT_SECONDS (default 300).
set -eu

namespace="${DEFAULT_NAMESPACE:-default}"
retention="${DEFAULT_NAMESPACE_RETENTION:-720h}"
timeout="${NAMESPACE_TIMEOUT_SECONDS:-300}"
start=$(date +%s)

until temporal operator cluster health >/dev/null 2>&1; do
  if [ $(($(date +%s) - start)) -ge "$timeout" ]; then
    echo "Temporal at ${TEMPORAL_ADDRESS:-the default address} did not become healthy" >&2
    exit 1
  fi
  sleep 2
done

if temporal operator namespace describe --namespace "$namespace" >/dev/null 2>&1; then
  echo "namespace '$namespace' exists"
  exit 0
fi
temporal operator namespace create --namespace "$namespace" --retention "$retention"
echo "namespace '$namespace' created (retention $retention)"
