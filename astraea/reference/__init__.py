"""The reference models astraea ships: small Wan transformers trained on procedural clips of
moving shapes, their prompt encoders and samplers, the data they learned from, and checks that
judge whether a generated clip shows what its prompt says. v1 (this package's modules) works in
pixel space and predicts the clean clip (astraea/assets/MODEL_CARD.md); v2 (`latent/`) predicts
Wan's velocity on Wan-VAE latents (astraea/assets/MODEL_CARD_v2.md).
"""
