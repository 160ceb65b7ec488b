"""Model of mm/swap.c: putting folios on the LRU and moving them along it.

The anon LRU is a stamp per folio (``FolioTable.lru``, -1 when the folio is
not on it): the smallest stamp is the oldest folio.  :class:`Lruvec` holds the
stamps of both ends: ``folio_add_lru()`` stamps above the tail (the youngest
end), ``folio_deactivate()`` below the head (reclaimed first).  Reclaim takes
the oldest folios off it with ``vmscan.isolate_lru_folios()``.

Simplification: one list with second-chance ageing, not the active and
inactive lists (nor MGLRU); no per-CPU folio batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .kernel import Kernel


class Lruvec:
    """Model of struct lruvec for the one anon LRU: the stamps at its ends, reclaim's isolation buffer."""

    def __init__(self) -> None:
        self.tail = 1 << 40                # the next stamp of folio_add_lru() (youngest end)
        self.head = (1 << 40) - 1          # the next stamp of folio_deactivate() (oldest end)
        # Optimization for vmscan.isolate_lru_folios(): the oldest folios, sorted once
        # ((ids, their stamps) or None), handed out from isolate_pos on.
        self.isolate_buf: tuple[np.ndarray, np.ndarray] | None = None
        self.isolate_pos = 0


def folio_add_lru(k: Kernel, fid) -> None:
    """Model of folio_add_lru(): to the tail (youngest end); ``fid`` may be an array of ids."""
    lru = k.lruvec
    if isinstance(fid, np.ndarray):
        n = len(fid)
        k.folios.lru[fid] = np.arange(lru.tail, lru.tail + n)
        lru.tail += n
    else:
        k.folios.lru[fid] = lru.tail
        lru.tail += 1


def folio_deactivate(k: Kernel, fid: int) -> None:
    """Model of folio_deactivate() (lru_deactivate()) for MADV_COLD: to the head, reclaimed first."""
    lru = k.lruvec
    k.folios.lru[fid] = lru.head
    lru.head -= 1
    lru.isolate_buf = None
