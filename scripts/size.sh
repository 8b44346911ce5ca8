#!/usr/bin/env bash
# The static binary's size and what it is made of, by crate (for `just size`).
# Usage: scripts/size.sh STRIPPED_BINARY UNSTRIPPED_BINARY PREVIOUS_BYTES TARGET_BYTES
#
# The contributors come from the symbol table of an unstripped build of the same code: every
# defined function and data symbol with its size, demangled, attributed to the crate named first in
# its path (`<ureq::x as core::fmt::Debug>::fmt` counts for ureq, `ring_core_0_17_*` C code for
# ring, other C symbols for musl libc). Generic code counts for the crate that defines it, not the
# one that instantiates it, so treat the split as an estimate, as cargo-bloat's is.
set -euo pipefail
bin=$1 full=$2 previous=$3 target=$4
mb() { awk -v b="$1" 'BEGIN { printf "%.2f MB", b / 1000000 }'; }
size=$(stat -c %s "$bin")
printf '%-22s %9d bytes  %s\n' "static x86_64" "$size" "$(mb "$size")"
printf '%-22s %9d bytes  %s  (%+d bytes)\n' "previous" "$previous" "$(mb "$previous")" $((size - previous))
verdict=ok; [ "$size" -le "$target" ] || verdict=MISS
printf '%-22s %9d bytes  %s  %s\n' "target" "$target" "$(mb "$target")" "$verdict"
echo
echo "biggest contributors (symbol sizes of the unstripped build):"
nm -S -t d --size-sort -C "$full" | awk '
    NF >= 4 && $3 ~ /^[tTrRdDbB]$/ {
        size = $2 + 0
        name = $4; for (i = 5; i <= NF; i++) name = name " " $i
        sub(/^(<|&|\*const |\*mut |dyn |_<|bool |void |int |unsigned )+/, "", name)
        if (name ~ /^ring_core_/ || name ~ /^(GFp|LIMBS|bn_|aes_nohw|ChaCha20|CRYPTO_poly1305|x25519|p256|p384|ecp_nistz256|sha512_block)/) crate = "ring (C/asm)"
        else if (name ~ /::/) { crate = name; sub(/::.*/, "", crate); sub(/<.*/, "", crate) }
        else crate = "musl libc and other C"
        if (crate == "_") crate = "std"
        sum[crate] += size; total += size
    }
    END {
        for (c in sum) printf "%10d  %5.1f%%  %s\n", sum[c], 100 * sum[c] / total, c
    }' | sort -rn | head -15
