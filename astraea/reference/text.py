"""The reference model's prompt encoder: a fixed vocabulary and a learned embedding table.

The prompts of `data.py` use a few dozen words, so a word table plus a table of positions
(word order binds each colour, shape and direction to its object) is all the text model the
reference needs; it is trained with the transformer and shipped in the same weights file.
Its output is what a diffusers video DiT takes as `encoder_hidden_states`: [B, L, text_dim],
zero at padding, so the empty prompt (the unconditional branch of guidance) is all zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES

PAD = "<pad>"
VOCAB = (PAD, "a", "and", "moving", "on", "background", *BACKGROUNDS, *COLOURS, *SHAPES, *DIRECTIONS)
MAX_TOKENS = 16
TEXT_DIM = 128

_INDEX = {word: i for i, word in enumerate(VOCAB)}


def tokenize(texts: list[str], index: dict[str, int] = _INDEX, max_tokens: int = MAX_TOKENS,
             split=str.split) -> torch.Tensor:
    """Word ids [B, max_tokens], padded with 0, from the vocabulary's `index` (word -> id); an
    error names any word outside it."""
    ids = torch.zeros(len(texts), max_tokens, dtype=torch.long)
    for b, text in enumerate(texts):
        words = split(text)
        if len(words) > max_tokens:
            raise ValueError(f"prompt {text!r} has {len(words)} words; the encoder reads at most {max_tokens}")
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(f"prompt {text!r} uses words outside the vocabulary: {unknown}; known: {' '.join(list(index)[1:])}")
        ids[b, : len(words)] = torch.tensor([index[w] for w in words], dtype=torch.long)
    return ids


class PromptEncoder(nn.Module):
    """Word and position embeddings of a fixed vocabulary; v2 (`latent/text.py`) passes its own
    vocabulary and tokenizer."""

    def __init__(self, dim: int = TEXT_DIM, vocabulary: tuple[str, ...] = VOCAB, max_tokens: int = MAX_TOKENS,
                 tokenizer=tokenize):
        super().__init__()
        self.words = nn.Embedding(len(vocabulary), dim)
        self.positions = nn.Parameter(torch.randn(max_tokens, dim))
        self.tokenize = tokenizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.words(ids) + self.positions) * (ids != 0).unsqueeze(-1)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Prompt embeddings [B, max_tokens, dim] on the encoder's device and dtype; "" gives zeros."""
        return self(self.tokenize(texts).to(self.positions.device))
