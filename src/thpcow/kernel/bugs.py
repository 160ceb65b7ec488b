"""Injectable kernel bugs: deliberately broken kernels that the checkers must catch.

In the spirit of the kernel's fault injection, each bug is a named switch,
off unless a kernel is built with it (``Kernel(inject=("name", ...))``).  A
bug sits at one place in the code it breaks; the tests build a kernel with
it and show that the invariant checker, page_table_check or a reference
model of memory contents catches it.  They are tools for testing the
checkers (and, later, the fuzzer), not kernel variants: see builds.py for
those.
"""

from __future__ import annotations

BUGS: dict[str, str] = {
    "copy-first-page-only": "copy_user_large_folio() copies the first page only; the others keep "
                            "the new folio's zeroes",
    "mm-ids-shared-sticks": "folio_sub_return_large_mapcount() never clears the MM_IDS_SHARED bit",
    "mm-ids-slot-leak": "folio_sub_return_large_mapcount() keeps the mm-id slot of an mm whose "
                        "last mapping went",
    "cow-reuses-shared": "wp_can_reuse_anon_folio() reuses a small folio that another process still "
                         "maps, so a COW write fault maps it writable instead of copying it",
    "mprotect-keeps-write": "change_protection() is skipped, so entries stay writable after "
                            "mprotect() removes PROT_WRITE",
}


def parse_bugs(names) -> frozenset[str]:
    """The set of bugs to inject; ValueError naming an unknown one."""
    if isinstance(names, str):
        names = [names]
    out = frozenset(names or ())
    unknown = sorted(out - BUGS.keys())
    if unknown:
        raise ValueError(f"inject={unknown[0]!r}: unknown bug; known: {', '.join(sorted(BUGS))}")
    return out
