#!/usr/bin/env bash
# Fuzz parse + validate for N seconds (default 60): `queries/fuzz/run.sh 1800`.
# Seeds the corpus from the refused/allowed query corpora. Needs cargo-fuzz (installed if
# missing) and nightly features, enabled here with RUSTC_BOOTSTRAP=1 on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p corpus/validate
python3 - <<'PY'
from pathlib import Path
i = 0
for f in ["../tests/corpus/refused.sql", "../tests/corpus/allowed.sql"]:
    sql = []
    for line in Path(f).read_text().splitlines():
        if line == ";;":
            Path(f"corpus/validate/seed-{i:04}.sql").write_text("\n".join(sql)); i += 1; sql = []
        elif not line.startswith("-- "):
            sql.append(line)
PY
RUSTC_BOOTSTRAP=1 cargo fuzz run validate --sanitizer none -- -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10 corpus/validate
