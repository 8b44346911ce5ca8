/* Linked into the ppc64le and s390x builds (see `just cross`).
 *
 * Those targets have no prebuilt Rust std, so std is built from source and its unwinder is
 * Debian's cross libgcc_eh.a. GCC 12 built that for glibc: _Unwind_Find_FDE calls glibc's
 * _dl_find_object(), which musl does not have, so the link fails. This stand-in reports "no
 * object found"; libgcc then finds no unwind tables, so the only thing lost is the frames of
 * a RUST_BACKTRACE after a panic. Panics abort (panic = "abort") and still print their message.
 */
int _dl_find_object(void *pc, void *result)
{
    (void)pc;
    (void)result;
    return -1;
}
