"""The prompt encoder of reference model v2: a fixed vocabulary and a learned embedding table.

The prompts of `scenes.py` use three dozen words, so a word table plus a table of positions
(word order binds each speed, colour, shape and direction to its object) is all the text
model needed; it is trained with the transformer and saved in the same weights file. Its
output is a diffusers video DiT's `encoder_hidden_states`, [B, MAX_TOKENS, TEXT_DIM], zero at
padding, so the empty prompt (the unconditional branch of guidance) is all zeros.
"""

from __future__ import annotations

import torch

from .. import text
from .scenes import BACKGROUNDS, CAMERAS, COLOURS, DIRECTIONS, SHAPES, SPEEDS

PAD = "<pad>"
_CAMERA_WORDS = dict.fromkeys(word for camera in CAMERAS for word in camera.split() if word not in DIRECTIONS)
VOCAB = (PAD, "a", "and", "moving", "on", "background", ",", "camera", *_CAMERA_WORDS,
         *BACKGROUNDS, *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS)
MAX_TOKENS = 32  # three objects of six words, two "and", "on a ... background , camera" and a motion
TEXT_DIM = 128
_INDEX = {word: i for i, word in enumerate(VOCAB)}


def words(text: str) -> list[str]:
    """The tokens of a prompt: its words, with the comma as a word of its own."""
    return text.replace(",", " , ").split()


def tokenize(texts: list[str]) -> torch.Tensor:
    """Word ids [B, MAX_TOKENS], padded with 0; an error names any word outside VOCAB."""
    return text.tokenize(texts, _INDEX, MAX_TOKENS, words)


def detokenize(ids: torch.Tensor) -> list[str]:
    """The prompts of word ids [B, MAX_TOKENS], as `Prompt.text` writes them."""
    return [" ".join(VOCAB[i] for i in row if i).replace(" ,", ",") for row in ids.tolist()]


class PromptEncoder(text.PromptEncoder):
    def __init__(self, dim: int = TEXT_DIM):
        super().__init__(dim, VOCAB, MAX_TOKENS, tokenize)
