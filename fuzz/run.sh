#!/usr/bin/env bash
# Runs cnnc's fuzz targets (cargo-fuzz, libFuzzer; needs the nightly toolchain and `cargo install
# cargo-fuzz`), each for SECONDS (default 30), in the order given (default: all), seeded from the
# repository's models and fixtures and the committed minimized corpus (fuzz/corpora/TARGET.tar.gz, unpacked
# into the git-ignored fuzz/corpus/TARGET on first use, where new inputs then accumulate).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# A crash leaves its input under fuzz/artifacts/TARGET/ and fails the script; pin it as a test.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(model_text weights npy image onnx differential)

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds"/{model_text,weights,npy,image,onnx,differential}
cp models/*.model tests/filetests/*.model tests/fixtures/ops/*.model compiler/src/prelude.model "$seeds/model_text/"
cp models/digits.npz tests/fixtures/ops/*.npz "$seeds/weights/"
for f in tests/fixtures/ops/*.in.npy tests/fixtures/digits/y_test.npy tests/fixtures/onnx/*.npy; do
    tail -c +7 "$f" > "$seeds/npy/$(basename "$f")"   # the target adds the magic bytes back
done
for f in models/examples/digit-*.png models/examples/cat.jpg; do
    { printf '\x07'; cat "$f"; } > "$seeds/image/$(basename "$f")"   # the first byte picks a resize
done
cp tests/fixtures/onnx/*.onnx "$seeds/onnx/"

for t in "${targets[@]}"; do
    # The differential target's committed corpus takes minutes to replay (a model compiled and run per
    # input, and libFuzzer replays before its clock starts): brief runs, as CI's, start it afresh.
    if [ ! -d "fuzz/corpus/$t" ] && [ -f "fuzz/corpora/$t.tar.gz" ] && { [ "$t" != differential ] || [ "$secs" -ge 60 ]; }; then
        mkdir -p fuzz/corpus && tar -C fuzz/corpus -xzf "fuzz/corpora/$t.tar.gz"
    fi
    mkdir -p "fuzz/corpus/$t"
    echo "== $t: ${secs}s"
    # The differential target runs a few models a second: libFuzzer would take hours to let its inputs
    # grow past 8 bytes (a model of one or two layers), so they may be as long as 128 at once.
    len=(-max_len=262144)
    [ "$t" != differential ] || len=(-max_len=128 -len_control=0)
    cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "$seeds/$t" -- \
        -max_total_time="$secs" "${len[@]}" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 2>&1 \
        | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss|==[0-9]+== ERROR|SUMMARY|Done [0-9]+ runs)|cov:" | tail -4
done
