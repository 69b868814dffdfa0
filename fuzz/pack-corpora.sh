#!/usr/bin/env bash
# Minimizes each target's corpus (cargo fuzz cmin) and packs the inputs of at most 32 KiB into
# fuzz/corpora/TARGET.tar.gz, the committed corpus. Larger inputs are the repository's own files (the
# seeds fuzz/run.sh adds every time) and their mutations, which would only bloat the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p fuzz/corpora
for dir in fuzz/corpus/*/; do
    t=$(basename "$dir")
    cargo +nightly fuzz cmin -O "$t" "fuzz/corpus/$t" > /dev/null 2>&1
    (cd fuzz/corpus && find "$t" -type f -size -33k -print0 | sort -z | tar --null -T - --mtime=2026-01-01 --owner=0 --group=0 -czf "../corpora/$t.tar.gz")
    echo "$t: $(find "fuzz/corpus/$t" -type f -size -33k | wc -l) inputs, $(du -h "fuzz/corpora/$t.tar.gz" | cut -f1)"
done
