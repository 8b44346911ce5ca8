#!/usr/bin/env bash
# The compatibility matrix (`just compat`): the share, attach and tunnel suites (and the tmux unit
# tests) with each old tmux as the client's tmux, the link suite with OpenSSH 7.4's client. The
# customer's terminal in the tests stays the system's tmux; only the client under test gets the old
# tool first on its PATH (TUNL_TEST_CLIENT_PATH, read by tests/common). Writes the matrix to
# target/compat-matrix.md; fails if any cell failed.
set -uo pipefail
cd "$(dirname "$0")/.."
versions="${*:-1.8 2.7 3.0a 3.2a 3.5a}"
built="$(COMPAT_TMUX="$versions" scripts/compat-build.sh)" || exit 1
path_of() { awk -v n="$1" '$1 == n { print $2 }' <<<"$built"; }
cargo build -q --workspace --all-targets || exit 1
mkdir -p target
out=target/compat-matrix.md
logs=target/compat-logs
rm -rf "$logs"
mkdir -p "$logs"
printf '| client tool | unit (tmux) | share | attach | tunnel | link |\n|---|---|---|---|---|---|\n' >"$out"
fail=0
# cell LOG-NAME ENV... -- CARGO-TEST-ARGS: one cell of the matrix, "pass (time)" or "FAIL (...)".
cell() {
    local log="$logs/$1.log"; shift
    local env=()
    while [ "$1" != "--" ]; do env+=("$1"); shift; done
    shift
    local start=$SECONDS
    if env "${env[@]}" cargo test -q "$@" >"$log" 2>&1; then
        echo "pass ($((SECONDS - start)) s)"
        return
    fi
    local r; r="$(grep -E '^test result' "$log" | tail -1 | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\2 of \1+\2 failed/')"
    # The end-to-end tests wait on real processes with deadlines; on a loaded machine one may miss
    # its deadline. The failed tests (and only they) run once more, on their own; the cell says so.
    local failed; failed="$(awk '/^failures:$/ { n++ } n == 2 && /^    [a-z_0-9:]+$/ { print $1 }' "$log" | tr '\n' ' ')"
    if [ -n "$failed" ] && env "${env[@]}" cargo test -q "$@" $failed --exact >"$log.retry" 2>&1; then
        echo "pass ($((SECONDS - start)) s; on a second run: ${failed% })"
        return
    fi
    echo "FAIL (${r:-did not run}${failed:+: ${failed% }}; $log)"
    return 1
}
for v in $versions; do
    bin="$(dirname "$(path_of "tmux-$v")")"
    echo "== tmux $v ($bin)" >&2
    # The unit tests start their own tmux servers with `tmux` from PATH.
    u="$(cell "tmux-$v-unit" "PATH=$bin:$PATH" -- --bin linbit-tunl -- --test-threads=4 tmux:: ui::)" || fail=1
    s="$(cell "tmux-$v-share" "TUNL_TEST_CLIENT_PATH=$bin" -- --test share -- --test-threads=4)" || fail=1
    a="$(cell "tmux-$v-attach" "TUNL_TEST_CLIENT_PATH=$bin" -- --test attach -- --test-threads=4)" || fail=1
    t="$(cell "tmux-$v-tunnel" "TUNL_TEST_CLIENT_PATH=$bin" -- --test tunnel -- --test-threads=4)" || fail=1
    printf '| tmux %s | %s | %s | %s | %s | - |\n' "$v" "$u" "$s" "$a" "$t" | tee -a "$out" >&2
done
if [ -z "${COMPAT_NO_SSH:-}" ]; then
    bin="$(dirname "$(path_of openssh-7.4p1)")"
    echo "== OpenSSH 7.4p1 ($bin)" >&2
    l="$(cell "openssh-7.4p1-link" "TUNL_TEST_CLIENT_PATH=$bin" -- --test link -- --test-threads=4)" || fail=1
    printf '| OpenSSH 7.4p1 client | - | - | - | - | %s |\n' "$l" | tee -a "$out" >&2
fi
cat "$out"
# One closing line over every cell: the tests of each first run, with the second run's outcome for
# the tests that failed there (a cell whose build failed counts as one failed test).
passed=0 failed=0
for log in "$logs"/*.log; do
    r="$(grep -E '^test result' "$log" | tail -1)"
    [ -f "$log.retry" ] && r2="$(grep -E '^test result' "$log.retry" | tail -1)" || r2=""
    p="$(sed -nE 's/.* ([0-9]+) passed;.*/\1/p' <<<"$r")"
    f="$(sed -nE 's/.* ([0-9]+) failed;.*/\1/p' <<<"$r")"
    if [ -z "$p" ]; then
        failed=$((failed + 1))
        continue
    fi
    if [ -n "$r2" ]; then
        p=$((p + $(sed -nE 's/.* ([0-9]+) passed;.*/\1/p' <<<"$r2")))
        f="$(sed -nE 's/.* ([0-9]+) failed;.*/\1/p' <<<"$r2")"
    fi
    passed=$((passed + p)) failed=$((failed + f))
done
echo "compat: $passed passed, $failed failed"
exit $fail
