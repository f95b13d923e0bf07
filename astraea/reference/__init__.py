"""The reference model astraea ships: a small Wan transformer trained on procedural clips of
moving shapes, its prompt encoder and sampler, the data it learned from, and checks that
judge whether a generated clip shows what its prompt says. See astraea/assets/MODEL_CARD.md.
"""
