#!/bin/sh
# One-shot set-up for docker-compose: development certificates (node certificates carry the
# lowercase agency, i.e. the container name, as a DNS name) and synthetic data. Idempotent.
set -eu
if [ ! -f /certs/ca.pem ]; then
  cxfed certs dev --federation cx-demo --agencies SSA,CMS,OPM --out /certs
fi
seed=1
for a in ssa cms opm; do
  A=$(echo "$a" | tr a-z A-Z)
  if [ ! -d "/data/$a/experience" ]; then
    cxfed synth --agency "$A" --people 20000 --seed "$seed" --out "/tmp/synth-$a"
    cxfed ingest --data-dir "/data/$a" --table operational "/tmp/synth-$a/operational.csv"
    cxfed ingest --data-dir "/data/$a" --table experience "/tmp/synth-$a/experience.csv"
  fi
  seed=$((seed + 1))
done
# The nodes run as uid 10001: let them read their keys and write their data and audit logs.
chown -R 10001 /certs /data
