"""The segments of a token axis: video tokens, and the small segments joined to them.

Joint attention concatenates the video tokens with text (audio, reference frames...) along the
sequence: a tensor's token axis is then a run of segments. Only the video segment is sparse
(its rows are the selected tokens); every other segment is always computed in full, so its
keys, values and outputs stay exact. A `Layout` says, for one tensor, how long each segment is
and which one (if any) holds the video tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    sizes: tuple[int, ...]
    video: int | None  # position of the video segment, None for a tensor of small segments only
    # The token axis folded into a leading dim with the batch (rows are (sample, token) pairs,
    # sample-major), as factorised attention regroups [B, F, S, C] into [B * S, F, C].
    folded: bool = False

    def fold(self) -> "Layout":
        return Layout(self.sizes, self.video, folded=True)

    def unfold(self) -> "Layout":
        return Layout(self.sizes, self.video)

    @classmethod
    def of_video(cls, n: int) -> "Layout":
        return cls((n,), 0)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def only_video(self) -> bool:
        return self.video == 0 and len(self.sizes) == 1 and not self.folded

    @property
    def has_video(self) -> bool:
        return self.video is not None

    def offsets(self) -> list[int]:
        out, at = [], 0
        for size in self.sizes:
            out.append(at)
            at += size
        return out

    def concat(self, *others: "Layout") -> "Layout | None":
        """The layout of the concatenation, or None when two parts both hold video tokens."""
        sizes, video = list(self.sizes), self.video
        for other in others:
            if other.video is not None:
                if video is not None:
                    return None
                video = len(sizes) + other.video
            sizes += other.sizes
        return Layout(tuple(sizes), video)

    def segments(self, start: int, stop: int) -> tuple[int, int] | None:
        """Positions [i, j) of the segments exactly covering rows [start, stop), or None when
        the range cuts through a segment."""
        bounds = self.offsets() + [self.total]
        if start not in bounds or stop not in bounds or stop <= start:
            return None
        return bounds.index(start), bounds.index(stop)

    def sub(self, i: int, j: int) -> "Layout":
        """Segments [i, j)."""
        video = self.video - i if self.video is not None and i <= self.video < j else None
        return Layout(self.sizes[i:j], video)

    def describe(self) -> str:
        text = "+".join(f"{'video ' if k == self.video else ''}{s}" for k, s in enumerate(self.sizes))
        return f"{text} folded into the batch" if self.folded else text
