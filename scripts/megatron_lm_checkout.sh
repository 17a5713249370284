# Sourced by scripts/test_megatron_lm.sh and scripts/test_slime.sh: what a Megatron-LM checkout is.
#   megatron_core_version CHECKOUT   -> e.g. 0.19.1 (megatron/core/package_info.py of the checkout)
#   describe_megatron_lm CHECKOUT    -> "Megatron-LM <tag or commit> at CHECKOUT (megatron-core X)"

megatron_core_field() {  # megatron_core_field CHECKOUT NAME: MAJOR, MINOR, PATCH or PRE_RELEASE
    sed -n "s/^$2 = [\"']\{0,1\}\([^\"']*\)[\"']\{0,1\}\$/\1/p" \
        "$1/megatron/core/package_info.py" | head -1
}

megatron_core_version() {
    local f
    f() { megatron_core_field "$1" "$2"; }
    echo "$(f "$1" MAJOR).$(f "$1" MINOR).$(f "$1" PATCH)$(f "$1" PRE_RELEASE)"
}

describe_megatron_lm() {
    local rev
    rev=$(git -C "$1" describe --tags --always 2>/dev/null || echo "(not a git checkout)")
    echo "Megatron-LM $rev at $1 (megatron-core $(megatron_core_version "$1") in the checkout)"
}
