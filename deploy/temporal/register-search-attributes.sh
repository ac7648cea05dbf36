#!/usr/bin/env bash
# Registers the custom search attributes the deploy workflow keeps up to date, as Keyword,
# on the namespace the workers use. Safe to run on every start: the server accepts a
# repeated registration of the same name and type, and refuses a clash of types.
#
# Environment: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, SEARCH_ATTRIBUTES (space-separated
# names), REGISTER_TIMEOUT_SECONDS (how long to wait for the namespace, default 300).
set -euo pipefail

namespace="${TEMPORAL_NAMESPACE:-default}"
read -r -a names <<<"${SEARCH_ATTRIBUTES:?SEARCH_ATTRIBUTES must list the attribute names}"
deadline=$((SECONDS + ${REGISTER_TIMEOUT_SECONDS:-300}))

# The namespace job creates it; a server that answers may not have it yet.
until temporal operator namespace describe --namespace "$namespace" >/dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    echo "namespace '$namespace' did not appear on ${TEMPORAL_ADDRESS:-the server}" >&2
    exit 1
  fi
  sleep 2
done

for name in "${names[@]}"; do
  temporal operator search-attribute create --namespace "$namespace" --name "$name" --type Keyword
  echo "search attribute $name (Keyword) registered on namespace '$namespace'"
done
