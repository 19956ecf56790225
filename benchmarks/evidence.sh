#!/usr/bin/env bash
# The evidence suite, one script after the other (stability, off-policy, beta and k), with each one's wall time
# and the total. Arguments go to every script (--fresh: rerun every run instead of continuing).
#   bash benchmarks/evidence.sh --fresh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=1
start=$(date +%s)
for script in stability off_policy beta_k; do
    t=$(date +%s)
    .venv/bin/python "benchmarks/${script}.py" "$@"
    echo "evidence: ${script}.py took $(( $(date +%s) - t )) s"
done
echo "evidence: the suite took $(( $(date +%s) - start )) s"
