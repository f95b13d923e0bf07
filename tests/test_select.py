"""Token selection per sample: every row of a score picks the same number of tokens."""

import torch

import astraea
from astraea.runtime.select import select


def test_rows_select_their_own_tokens():
    score = torch.tensor([[0.0, 5, 1, 4, 2, 3], [5, 0, 4, 1, 3, 2]])
    assert select(score, 3, astraea.AstraeaConfig(), None).tolist() == [[1, 3, 5], [0, 2, 4]]


def test_a_short_last_run_is_filled_with_the_rows_best_other_tokens():
    """10 tokens in runs of 4: the last run has 2. A row that picks it gets its 2 tokens, the
    other chosen run's 4, and its 2 best other tokens, so every row has 8."""
    config = astraea.AstraeaConfig(group="run", group_size=4)
    score = torch.zeros(2, 10)
    score[0, 8:] = 10.0  # row 0: the short run [8, 9] first, then run [0, 4) by its 3.0 ...
    score[0, 0], score[0, 5] = 3.0, 1.0  # ... and of the others, token 5 before 4, 6 or 7
    score[1, 4:8], score[1, :4] = 10.0, 5.0  # row 1: runs [4, 8) and [0, 4), no short run
    idx = select(score, 5, config, None)
    assert idx.shape == (2, 8)
    assert set(idx[0].tolist()) >= {0, 1, 2, 3, 8, 9, 5}
    assert idx[1].tolist() == list(range(8))
    assert all(len(set(row.tolist())) == 8 for row in idx)
