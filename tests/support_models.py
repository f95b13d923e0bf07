"""Every video transformer class the installed diffusers exports, at a tiny config.

`video_transformer_classes()` lists the classes; `CASES` holds a factory per class (and a few
variants of one class, such as Wan 2.2 TI2V's per-token timestep). A factory builds the real
class with random weights (seeded), `.eval()`, in fp32, and returns a `SupportFamily`: a
`tests.models.Family` (so `tests.models.sample` runs a CFG loop on it) plus `inputs(latent, t,
context)`, the forward's keyword arguments for one call. A class with no factory is listed by
`tests.support_table` as having no small config yet.

Sizes: widths 32-48, 2 heads, 2 blocks (one of each kind where a class has two kinds), a few
frames, 16-64 video tokens, text length 8. Two projections keep the width the class hardcodes:
HunyuanVideo 1.5's ByT5 text projection (2048) and Wan-Animate-2's CLIP image projection (1280).
Conditioning other than the text (image latents, reference frames, audio, camera, KV caches of
earlier chunks) is fixed when the model is built; the loop denoises the video latent only.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch

import diffusers
from tests.models import Family

TEXT_LEN = 8


@dataclass
class SupportFamily(Family):
    """A `Family` whose call is `model(**inputs(latent, t, context))`, output `pick`ed from the tuple."""

    inputs: Callable = None  # inputs(latent, t, context) -> forward kwargs (return_dict=False)

    def example(self, t: float = 500.0, branch: int = 0) -> dict:
        """The forward's kwargs for a random latent at timestep `t` and conditioning `branch` (0 = cond)."""
        g = torch.Generator().manual_seed(0)
        return self.inputs(torch.randn(self.latent_shape, generator=g), torch.tensor([float(t)]), self.conditions[branch])


@dataclass(frozen=True)
class Case:
    label: str  # the table's row: the class name, plus the variant if any
    cls: str  # the diffusers class name
    build: Callable[[], SupportFamily]
    dynamo: tuple = ()  # (name, value) of dynamo config flags a user sets for this row

    @property
    def id(self) -> str:
        """The case's test id: its factory, and the flags it runs with."""
        return "-".join([self.build.__name__, *(name for name, _ in self.dynamo)])

    def traced(self):
        """The context its compiles and calls run in: dynamo with the row's flags."""
        return torch._dynamo.config.patch(**dict(self.dynamo))


def _family(name, model, latent_shape, conditions, inputs, pick=lambda out: out[0]) -> SupportFamily:
    def call(m, x, t, e):
        return pick(m(**inputs(x, t, e)))

    # sparse=None: whether astraea makes it sparse is what the support table reports, not an input
    return SupportFamily(name, model.eval(), tuple(latent_shape), call, conditions, None, inputs)


def _conditions(dim, length=TEXT_LEN, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, dim, generator=g), torch.zeros(1, length, dim)


def _dict_conditions(**dims):
    """(cond, uncond) as dicts of keyword arguments: random embeddings and zeros."""
    g = torch.Generator().manual_seed(1)
    cond = {k: torch.randn(1, *shape, generator=g) for k, shape in dims.items()}
    return cond, {k: torch.zeros_like(v) for k, v in cond.items()}


def _fixed(*shape, seed=2):
    """A fixed conditioning tensor (image latents, reference frames...): the same at every call."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bt(t, x):
    """The sampler's [1] timestep as one per sample."""
    return t.expand(x.shape[0])


# --- Which classes -----------------------------------------------------------------------------


def _family_key(module: str) -> str:
    """`diffusers.models.transformers.transformer_cosmos3` -> `cosmos`: the module's model family."""
    stem = module.rsplit(".", 1)[-1]
    stem = re.sub(r"^transformer_|_transformer(_[23]d)?$", "", stem)
    return stem.rstrip("0123456789_")


def video_transformer_classes() -> list[str]:
    """Names of the video transformer classes the installed diffusers exports: every model class
    from `diffusers.models.transformers` whose name ends in `Transformer3DModel`, plus any other
    exported there from a module of the same model family or one whose name says video (Cosmos 3's
    `Cosmos3OmniTransformer`). A class diffusers adds later shows up here, factory or not."""
    found = {}
    for name in dir(diffusers):
        try:
            obj = getattr(diffusers, name)
        except Exception:  # a lazily imported class whose optional dependency is missing
            continue
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__.startswith(
            "diffusers.models.transformers."
        ):
            found[name] = obj.__module__
    families = {_family_key(m) for n, m in found.items() if n.endswith("Transformer3DModel")}
    return sorted(
        n for n, m in found.items()
        if n.endswith("Transformer3DModel") or _family_key(m) in families or "video" in m.rsplit(".", 1)[-1]
    )


# --- Wan and the models built on its blocks ----------------------------------------------------

_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
    freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
)


def _wan_like(name: str, cls, **extra) -> SupportFamily:
    """A class built on Wan's blocks, at Wan's tiny config, called as Wan is."""
    torch.manual_seed(0)
    model = cls(**_WAN, **extra)

    def inputs(x, t, e):
        return dict(hidden_states=x, timestep=_bt(t, x), encoder_hidden_states=e, return_dict=False)

    return _family(name, model, (1, 4, 3, 8, 8), _conditions(32), inputs)


def wan() -> SupportFamily:
    return _wan_like("wan", diffusers.WanTransformer3DModel)


def wan22_ti2v() -> SupportFamily:
    """Wan 2.2 TI2V-5B: one timestep per token ([B, N], `expand_timesteps`); the first frame is the
    conditioning image, at timestep 0."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**_WAN)
    frames, size = 3, 8
    per_frame = (size // 2) ** 2
    mask = torch.ones(frames * per_frame)
    mask[:per_frame] = 0

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=(mask * t).expand(x.shape[0], -1), encoder_hidden_states=e, return_dict=False
        )

    return _family("wan22_ti2v", model, (1, 4, frames, size, size), _conditions(32), inputs)


def chronoedit() -> SupportFamily:
    return _wan_like("chronoedit", diffusers.ChronoEditTransformer3DModel, rope_temporal_skip_len=8)


def skyreels_v2() -> SupportFamily:
    return _wan_like("skyreels_v2", diffusers.SkyReelsV2Transformer3DModel)


def skyreels_v2_df() -> SupportFamily:
    """SkyReels-V2 diffusion forcing: one timestep per latent frame ([B, F]), earlier frames cleaner."""
    torch.manual_seed(0)
    model = diffusers.SkyReelsV2Transformer3DModel(**_WAN)
    ramp = torch.tensor([0.5, 0.75, 1.0])

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=(ramp * t).expand(x.shape[0], -1), encoder_hidden_states=e,
            enable_diffusion_forcing=True, return_dict=False,
        )

    return _family("skyreels_v2_df", model, (1, 4, 3, 8, 8), _conditions(32), inputs)


def wan_vace() -> SupportFamily:
    torch.manual_seed(0)
    model = diffusers.WanVACETransformer3DModel(**_WAN, vace_layers=[0], vace_in_channels=12)
    control = _fixed(1, 12, 3, 8, 8)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=_bt(t, x), encoder_hidden_states=e, control_hidden_states=control,
            return_dict=False,
        )

    return _family("wan_vace", model, (1, 4, 3, 8, 8), _conditions(32), inputs)


def anyflow() -> SupportFamily:
    """AnyFlow flow map: latents laid out [B, F, C, H, W], one source and target timestep per frame
    (the target equals the source when sampling without mean velocity, as the pipeline does)."""
    torch.manual_seed(0)
    model = diffusers.AnyFlowTransformer3DModel(
        **_WAN, gate_value=0.25, deltatime_type="r",
    )

    def inputs(x, t, e):
        ts = t.reshape(1, 1).expand(x.shape[0], x.shape[1])
        return dict(hidden_states=x, timestep=ts, r_timestep=ts, encoder_hidden_states=e, return_dict=False)

    return _family("anyflow", model, (1, 3, 4, 8, 8), _conditions(32), inputs)


def helios() -> SupportFamily:
    """Helios with its three history segments (short, mid, long) before the noisy frames."""
    torch.manual_seed(0)
    model = diffusers.HeliosTransformer3DModel(
        **{k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}, rope_dim=(4, 6, 6),
    )
    frames, size = 2, 8
    short, mid = _fixed(1, 4, 1, size, size, seed=3), _fixed(1, 4, 1, size, size, seed=4)
    long = _fixed(1, 4, 4, size, size, seed=5)
    idx_long, idx_mid, idx_short = torch.arange(0, 4)[None], torch.arange(4, 5)[None], torch.arange(5, 6)[None]
    idx = torch.arange(6, 6 + frames)[None]

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=_bt(t, x), encoder_hidden_states=e, indices_hidden_states=idx,
            indices_latents_history_short=idx_short, indices_latents_history_mid=idx_mid,
            indices_latents_history_long=idx_long, latents_history_short=short, latents_history_mid=mid,
            latents_history_long=long, return_dict=False,
        )

    return _family("helios", model, (1, 4, frames, size, size), _conditions(32), inputs)


# --- CogVideoX and ConsisID (frames before channels) ---------------------------------------------

_COG = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
    text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True,
)


def cogvideox() -> SupportFamily:
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(**_COG)

    def inputs(x, t, e):
        return dict(hidden_states=x, encoder_hidden_states=e, timestep=_bt(t, x), return_dict=False)

    return _family("cogvideox", model, (1, 3, 4, 8, 8), _conditions(32), inputs)


def consisid() -> SupportFamily:
    """ConsisID with its face branch on (`is_train_face`): identity features cross-attended into the
    video tokens between blocks (width 48: the face features are 2/3 of it)."""
    torch.manual_seed(0)
    model = diffusers.ConsisIDTransformer3DModel(
        **{**_COG, "attention_head_dim": 24}, is_train_face=True, is_kps=False, cross_attn_interval=1,
        cross_attn_dim_head=16, cross_attn_num_heads=2, LFE_id_dim=8, LFE_vit_dim=8, LFE_depth=1, LFE_dim_head=8,
        LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=1,
    )
    id_cond, id_vit = _fixed(1, 8, seed=3), [_fixed(1, 4, 8, seed=4)]

    def inputs(x, t, e):
        return dict(
            hidden_states=x, encoder_hidden_states=e, timestep=_bt(t, x), id_cond=id_cond, id_vit_hidden=id_vit,
            return_dict=False,
        )

    return _family("consisid", model, (1, 3, 4, 8, 8), _conditions(32), inputs)


# --- Other single-stream and cross-attention DiTs -------------------------------------------------


def allegro() -> SupportFamily:
    torch.manual_seed(0)
    model = diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=32, sample_width=8, sample_height=8, sample_frames=3, caption_channels=32,
    )

    def inputs(x, t, e):
        return dict(hidden_states=x, encoder_hidden_states=e, timestep=_bt(t, x), return_dict=False)

    return _family("allegro", model, (1, 4, 3, 8, 8), _conditions(32), inputs)


def latte(batch: int = 1) -> SupportFamily:
    """Latte: each layer a spatial block (attention within each frame) then a temporal one (across
    frames at each position); learned sigma, so the first half of the output channels is the
    prediction (as the pipeline takes it). `batch` samples share the text."""
    torch.manual_seed(0)
    model = diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=32, video_length=3,
    )

    def inputs(x, t, e):
        return dict(hidden_states=x, encoder_hidden_states=e.expand(x.shape[0], -1, -1), timestep=_bt(t, x),
                    return_dict=False)

    return _family("latte", model, (batch, 4, 3, 8, 8), _conditions(32), inputs, pick=lambda out: out[0][:, :4])


def sana_video() -> SupportFamily:
    torch.manual_seed(0)
    model = diffusers.SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32,
    )

    def inputs(x, t, e):
        return dict(hidden_states=x, encoder_hidden_states=e, timestep=_bt(t, x), return_dict=False)

    return _family("sana_video", model, (1, 4, 3, 8, 8), _conditions(32), inputs)


def cosmos() -> SupportFamily:
    """Cosmos 1.0 without `concat_padding_mask`: that input channel is resized with torchvision,
    which is not installed here (one more input channel; the blocks are the same)."""
    torch.manual_seed(0)
    model = diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2,
        text_embed_dim=32, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    )
    mask = torch.ones(1, TEXT_LEN)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=_bt(t, x), encoder_hidden_states=e, attention_mask=mask, fps=24,
            return_dict=False,
        )

    return _family("cosmos", model, (1, 4, 3, 8, 8), _conditions(32), inputs)


def ltx() -> SupportFamily:
    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    )
    mask = torch.ones(1, TEXT_LEN)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, encoder_hidden_states=e, timestep=_bt(t, x), encoder_attention_mask=mask, num_frames=3,
            height=4, width=4, return_dict=False,
        )

    return _family("ltx", model, (1, 48, 8), _conditions(32), inputs)


def ltx2() -> SupportFamily:
    """LTX-2: a video stream and an audio stream, each with its own text; the audio latent is fixed
    conditioning here (the loop denoises the video)."""
    torch.manual_seed(0)
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=32,
        rope_double_precision=False,
    )
    audio = _fixed(1, 5, 8, seed=3)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.bool)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, audio_hidden_states=audio, encoder_hidden_states=e, audio_encoder_hidden_states=e,
            timestep=_bt(t, x), encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=3,
            height=4, width=4, audio_num_frames=5, fps=24.0, return_dict=False,
        )

    return _family("ltx2", model, (1, 48, 8), _conditions(32), inputs)


def mochi() -> SupportFamily:
    """Mochi: each sample attends over the video and its valid text tokens only, gathered with
    `torch.nonzero` of its text mask (here 6 of 8 valid, one gap: not only padding at the end),
    the result padded back to the joint length; dynamo splits the graph there by default."""
    torch.manual_seed(0)
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=16, activation_fn="swiglu",
        max_sequence_length=TEXT_LEN,
    )
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, encoder_hidden_states=e, timestep=_bt(t, x), encoder_attention_mask=mask.expand(x.shape[0], -1),
            return_dict=False,
        )

    return _family("mochi", model, (1, 4, 3, 8, 8), _conditions(32), inputs)


def easyanimate() -> SupportFamily:
    """EasyAnimate: one MMDiT block (separate text weights), then one shared block."""
    torch.manual_seed(0)
    model = diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=8,
        sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=16, text_embed_dim=32,
        time_position_encoding_type="3d_rope",
    )

    def inputs(x, t, e):
        return dict(hidden_states=x, timestep=_bt(t, x), encoder_hidden_states=e, return_dict=False)

    return _family("easyanimate", model, (1, 4, 3, 8, 8), _conditions(32), inputs)


# --- HunyuanVideo and its descendants (double-stream then single-stream blocks) ---------------------


def hunyuan_video() -> SupportFamily:
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    )
    mask, guidance = torch.ones(1, TEXT_LEN, dtype=torch.bool), torch.tensor([3.0])

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=_bt(t, x), encoder_attention_mask=mask, guidance=guidance, return_dict=False, **e,
        )

    conditions = _dict_conditions(encoder_hidden_states=(TEXT_LEN, 32), pooled_projections=(16,))
    return _family("hunyuan_video", model, (1, 4, 3, 8, 8), conditions, inputs)


def hunyuan_framepack() -> SupportFamily:
    """FramePack: the noisy frames packed with clean, 2x- and 4x-downsampled history latents, and
    image embeddings before the text."""
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=16,
        has_clean_x_embedder=True,
    )
    frames, size = 3, 8
    mask, guidance = torch.ones(1, TEXT_LEN, dtype=torch.bool), torch.tensor([3.0])
    image = _fixed(1, 4, 16, seed=3)
    clean, h2 = _fixed(1, 4, 2, size, size, seed=4), _fixed(1, 4, 2, size, size, seed=5)
    h4 = _fixed(1, 4, 8, size, size, seed=6)
    i4, i2, ic = torch.arange(0, 8), torch.arange(8, 10), torch.tensor([10, 14])
    idx = torch.arange(11, 11 + frames)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=_bt(t, x), encoder_attention_mask=mask, image_embeds=image, indices_latents=idx,
            guidance=guidance, latents_clean=clean, indices_latents_clean=ic, latents_history_2x=h2,
            indices_latents_history_2x=i2, latents_history_4x=h4, indices_latents_history_4x=i4, return_dict=False,
            **e,
        )

    conditions = _dict_conditions(encoder_hidden_states=(TEXT_LEN, 32), pooled_projections=(16,))
    return _family("hunyuan_framepack", model, (1, 4, frames, size, size), conditions, inputs)


def hunyuan_video15() -> SupportFamily:
    """HunyuanVideo 1.5, t2v: two texts (the second through the ByT5 projection) and image
    embeddings, zeros for t2v as the pipeline passes them."""
    torch.manual_seed(0)
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16,
        image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v",
    )
    mask, mask2 = torch.ones(1, TEXT_LEN), torch.ones(1, 4)
    image = torch.zeros(1, 3, 16)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=_bt(t, x), encoder_attention_mask=mask, encoder_attention_mask_2=mask2,
            image_embeds=image, return_dict=False, **e,
        )

    conditions = _dict_conditions(encoder_hidden_states=(TEXT_LEN, 32), encoder_hidden_states_2=(4, 16))
    return _family("hunyuan_video15", model, (1, 4, 3, 4, 4), conditions, inputs)


def motif_video() -> SupportFamily:
    """Motif-Video: the latent plus fixed image conditioning channels (an image latent and a mask:
    in_channels = 2C + 1, as in the released 33)."""
    torch.manual_seed(0)
    model = diffusers.MotifVideoTransformer3DModel(
        in_channels=4 + 5, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_decoder_layers=0, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=32, image_embed_dim=None, rope_axes_dim=(4, 6, 6),
    )
    condition = _fixed(1, 5, 3, 4, 4, seed=3)
    mask = torch.ones(1, TEXT_LEN)

    def inputs(x, t, e):
        return dict(
            hidden_states=torch.cat([x, condition.expand(x.shape[0], -1, -1, -1, -1)], dim=1), timestep=_bt(t, x),
            encoder_hidden_states=e, encoder_attention_mask=mask, return_dict=False,
        )

    return _family("motif_video", model, (1, 4, 3, 4, 4), _conditions(32), inputs)


# --- Channels-last and packed-sequence models ---------------------------------------------------


def kandinsky5() -> SupportFamily:
    """Kandinsky 5: latents [B, T, H, W, C]; text blocks, then visual blocks that cross-attend to the
    text; `return_dict=False` returns the tensor itself."""
    torch.manual_seed(0)
    model = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
    )
    frames, size = 3, 8
    rope = [torch.arange(frames), torch.arange(size // 2), torch.arange(size // 2)]
    text_pos = torch.arange(TEXT_LEN)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=_bt(t, x), visual_rope_pos=rope, text_rope_pos=text_pos, return_dict=False, **e,
        )

    conditions = _dict_conditions(encoder_hidden_states=(TEXT_LEN, 32), pooled_projections=(16,))
    return _family("kandinsky5", model, (1, frames, size, size, 4), conditions, inputs, pick=lambda out: out)


def kandinsky6() -> SupportFamily:
    """Kandinsky 6: latents [B, T, H, W, C] with the t2v conditioning channels (zero image latent and
    mask) after them, and a fixed audio latent through the fused audio-video blocks."""
    torch.manual_seed(0)
    model = diffusers.Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
        in_audio_dim=4, out_audio_dim=4,
    )
    frames, size = 3, 8
    condition = torch.zeros(1, frames, size, size, 5)
    audio = _fixed(1, 6, 4, seed=3)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.bool)

    def inputs(x, t, e):
        return dict(
            hidden_states=torch.cat([x, condition.expand(x.shape[0], -1, -1, -1, -1)], dim=-1), timestep=_bt(t, x),
            audio_hidden_states=audio, encoder_attention_mask=mask, return_dict=False, **e,
        )

    conditions = _dict_conditions(encoder_hidden_states=(TEXT_LEN, 32), pooled_projections=(16,))
    return _family("kandinsky6", model, (1, frames, size, size, 4), conditions, inputs)


def kandinsky6_sr() -> SupportFamily:
    """Kandinsky 6 super-resolution: text-free; latents [B, T, H, W, C] followed by a fixed anchor
    latent and mask; NABLA block-sparse flex attention, so the token grid is 8x8 per frame."""
    torch.manual_seed(0)
    model = diffusers.Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=32, ff_dim=64,
        num_visual_blocks=2, axes_dims=(4, 6, 6), nabla_window=(3, 3, 3),
    )
    anchor = torch.cat([_fixed(1, 1, 8, 8, 4, seed=3), torch.ones(1, 1, 8, 8, 1)], dim=-1)

    def inputs(x, t, e):
        return dict(
            hidden_states=torch.cat([x, anchor.expand(x.shape[0], -1, -1, -1, -1)], dim=-1), timestep=_bt(t, x),
            return_dict=False,
        )

    return _family("kandinsky6_sr", model, (1, 1, 8, 8, 4), (None, None), inputs)


def joyimage_edit() -> SupportFamily:
    """JoyImage-Edit: items [B, n, C, T, H, W], the reference image first and the noisy target last
    (the pipeline's order); the prediction is the target's."""
    torch.manual_seed(0)
    model = diffusers.JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=32, num_layers=2,
        rope_dim_list=[4, 6, 6],
    )
    reference = _fixed(1, 1, 4, 1, 8, 8, seed=3)

    def inputs(x, t, e):
        items = torch.cat([reference.expand(x.shape[0], -1, -1, -1, -1, -1), x[:, None]], dim=1)
        return dict(hidden_states=items, timestep=_bt(t, x), encoder_hidden_states=e, return_dict=False)

    return _family("joyimage_edit", model, (1, 4, 1, 8, 8), _conditions(32), inputs, pick=lambda out: out[0][:, -1])


def joyimage_edit_plus() -> SupportFamily:
    """JoyImage-Edit-Plus: patchified items [B, patches, C, pt, ph, pw], the target's 16 patches
    first and a reference image's after, with `shape_list`; the prediction is the target's."""
    torch.manual_seed(0)
    model = diffusers.JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=32, num_layers=2,
        rope_dim_list=[4, 6, 6],
    )
    reference = _fixed(1, 16, 4, 1, 2, 2, seed=3)
    mask = torch.ones(1, TEXT_LEN)

    def inputs(x, t, e):
        b = x.shape[0]
        return dict(
            hidden_states=torch.cat([x, reference.expand(b, -1, -1, -1, -1, -1)], dim=1), timestep=_bt(t, x),
            encoder_hidden_states=e, encoder_hidden_states_mask=mask.expand(b, -1),
            shape_list=[[(1, 4, 4), (1, 4, 4)]] * b, return_dict=False,
        )

    return _family(
        "joyimage_edit_plus", model, (1, 16, 4, 1, 2, 2), _conditions(32), inputs, pick=lambda out: out[0][:, :16]
    )


def minimax_h3() -> SupportFamily:
    """MiniMax-H3: one packed sequence of text, audio and video rows (patchified video latent
    [B, N, C*4]); every row at the step's timestep (a table of distinct timesteps in [0, 1], indexed
    per row), the audio latent fixed."""
    torch.manual_seed(0)
    model = diffusers.MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
        ffn_dim=64, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=32, freq_dim=16,
        time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2,
    )
    frames, grid, n_audio = 3, 4, 6
    n_video = frames * grid * grid
    length = TEXT_LEN + n_audio + n_video
    text_idx = torch.arange(TEXT_LEN)
    audio_idx = torch.arange(TEXT_LEN, TEXT_LEN + n_audio)
    video_idx = torch.arange(TEXT_LEN + n_audio, length)
    tags = torch.ones(length, dtype=torch.long)
    tags[audio_idx], tags[video_idx] = 2, 0
    pos = torch.zeros(length, 3)
    pos[:, 0] = torch.arange(length, dtype=torch.float32)
    v = torch.arange(n_video)
    pos[video_idx, 0] = (TEXT_LEN + n_audio + v // (grid * grid)).float()
    pos[video_idx, 1] = (v // grid % grid).float()
    pos[video_idx, 2] = (v % grid).float()
    audio = _fixed(1, n_audio, 8, seed=3)

    def inputs(x, t, e):
        return dict(
            hidden_states=x, audio_hidden_states=audio.expand(x.shape[0], -1, -1), encoder_hidden_states=e,
            timestep=t / 1000, timestep_indices=torch.zeros(length, dtype=torch.long), token_tags=tags,
            position_ids=pos, video_indices=video_idx, audio_indices=audio_idx, text_indices=text_idx,
            return_dict=False,
        )

    return _family("minimax_h3", model, (1, n_video, 16), _conditions(32), inputs)


def wan_animate() -> SupportFamily:
    """Wan-Animate: the latent plus fixed reference/conditioning channels, pose latents for every frame
    after the first, face video through the motion and face encoders, face adapter after block 0."""
    torch.manual_seed(0)
    model = diffusers.WanAnimateTransformer3DModel(
        **{**_WAN, "in_channels": 12}, latent_channels=4, image_dim=16,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )
    frames, size = 3, 8
    condition = _fixed(1, 8, frames, size, size, seed=3)
    pose = _fixed(1, 4, frames - 1, size, size, seed=4)
    face = _fixed(1, 3, 5, 16, 16, seed=5)
    image = _fixed(1, 4, 16, seed=6)

    def inputs(x, t, e):
        return dict(
            hidden_states=torch.cat([x, condition], dim=1), timestep=_bt(t, x), encoder_hidden_states=e,
            encoder_hidden_states_image=image, pose_hidden_states=pose, face_pixel_values=face, return_dict=False,
        )

    return _family("wan_animate", model, (1, 4, frames, size, size), _conditions(32), inputs)


def wan_animate_2() -> SupportFamily:
    """Wan-Animate-2 generation pass (`kv_cache_mode="cached"`): unbatched [C, F, H, W] latents in
    lists, attending to the reference K/V that one `"extract"` pass over a fixed driving clip wrote
    into the cache when the model was built; flex block-mask attention."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    torch.manual_seed(0)
    model = diffusers.WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=4 + 8, dim=32, ffn_dim=64, freq_dim=32, text_dim=32,
        out_dim=4, num_heads=2, num_layers=2, cross_attn_norm=True, use_img_emb=True,
    ).eval()
    ref_frames, size = 2, 8
    frames = ref_frames + 1
    grid = torch.tensor([[ref_frames, size // 2, size // 2]])
    image = _fixed(1, 4, 1280, seed=3)  # the model's CLIP projection takes 1280 features
    cache = WanAnimate2KVCache(2)
    with torch.no_grad():
        model(
            hidden_states=[_fixed(4, ref_frames, size, size, seed=4)], timestep=torch.tensor([1.0]),
            encoder_hidden_states=[_conditions(32)[0][0]], condition_latents=[_fixed(8, ref_frames, size, size, seed=5)],
            encoder_hidden_states_image=image, kv_cache=cache, kv_cache_mode="extract",
            seq_len=ref_frames * (size // 2) ** 2, offset_grid_sizes=grid,
        )
    condition = _fixed(8, frames, size, size, seed=6)

    def inputs(x, t, e):
        return dict(
            hidden_states=list(x), timestep=t, encoder_hidden_states=list(e), condition_latents=[condition] * len(x),
            encoder_hidden_states_image=image, kv_cache=cache, kv_cache_mode="cached",
            seq_len=frames * (size // 2) ** 2, reference_grid_sizes=grid, origin_len=4 * (frames - 2) + 1,
            origin_area=[16 * size // 2, 16 * size // 2], return_dict=False,
        )

    return _family("wan_animate_2", model, (1, 4, frames, size, size), _conditions(32), inputs,
                   pick=lambda out: torch.stack(out[0]))


def anyflow_far() -> SupportFamily:
    """AnyFlow FAR, autoregressive inference: the second chunk (2 frames) denoised against the KV cache
    of a first, clean chunk (1 frame). Each branch's cache is filled with its own prompt when the
    model is built (as the pipeline's cache step does) and travels in the branch's context."""
    torch.manual_seed(0)
    model = diffusers.AnyFlowFARTransformer3DModel(
        **_WAN, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, gate_value=0.25, deltatime_type="r",
        chunk_partition=(1, 2),
    ).eval()
    size, partition = 8, [1, 2]
    first = _fixed(1, 1, 4, size, size, seed=3)
    full_tokens, compressed_tokens = (size // 2) ** 2, (size // 4) ** 2
    cfg = model.config

    def fill(text):
        cache = {
            i: {
                "full_cache": torch.zeros(2, 1, 2, cfg.full_chunk_limit * max(partition) * full_tokens, 16),
                "compressed_cache": torch.zeros(
                    2, 1, 2, (len(partition) - cfg.full_chunk_limit + 1) * max(partition) * compressed_tokens, 16
                ),
            }
            for i in range(cfg.num_layers)
        }
        zero = torch.zeros(1, 1)
        with torch.no_grad():
            model(
                hidden_states=first, timestep=zero, r_timestep=zero, encoder_hidden_states=text,
                chunk_partition=partition[:1], kv_cache=cache,
                kv_cache_flag={"num_cached_chunks": 0, "is_cache_step": True},
                attention_mask=model.build_attention_mask(
                    chunk_partition=partition[:1], height=size, width=size, mode="cache"
                ),
                return_dict=False,
            )
        return cache

    cond, uncond = _conditions(32)
    conditions = (
        dict(encoder_hidden_states=cond, kv_cache=fill(cond)), dict(encoder_hidden_states=uncond, kv_cache=fill(uncond))
    )

    def inputs(x, t, e):
        ts = t.reshape(1, 1).expand(x.shape[0], x.shape[1])
        return dict(
            hidden_states=x, timestep=ts, r_timestep=ts, chunk_partition=partition,
            kv_cache_flag={"num_cached_chunks": 1, "is_cache_step": False}, return_dict=False, **e,
        )

    return _family("anyflow_far", model, (1, 2, 4, size, size), conditions, inputs)


def cosmos3_omni() -> SupportFamily:
    """Cosmos 3 Omni: one unbatched packed sequence, a causal text prefix (`input_ids`: the branch's
    context) then the video latent's patches, which carry the step's timestep one per token; text
    and generation tokens go through separate weights in every layer. Video latent [1, C, T, H, W]."""
    torch.manual_seed(0)
    model = diffusers.Cosmos3OmniTransformer(
        head_dim=16, hidden_size=32, intermediate_size=64, latent_channel=4, latent_patch_size=2,
        num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=2, patch_latent_dim=16,
        rope_axes_dim=[2, 3, 3], vocab_size=64, qk_norm_for_text=False, dtype="float32",
    )
    frames, grid = 3, 4
    n_video = frames * grid * grid
    length = TEXT_LEN + n_video
    v = torch.arange(n_video)
    pos = torch.cat(
        [
            torch.arange(TEXT_LEN).expand(3, -1),
            torch.stack([TEXT_LEN + v // (grid * grid), v // grid % grid, v % grid]),
        ],
        dim=1,
    )
    video_idx = torch.arange(TEXT_LEN, length)
    cond = torch.randint(1, 64, (TEXT_LEN,), generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros(TEXT_LEN, dtype=torch.long)

    def inputs(x, t, e):
        return dict(
            input_ids=e, text_indexes=torch.arange(TEXT_LEN), position_ids=pos, und_len=TEXT_LEN,
            sequence_length=length, vision_tokens=[x], vision_token_shapes=[(frames, grid, grid)],
            vision_sequence_indexes=video_idx, vision_mse_loss_indexes=video_idx,
            vision_timesteps=t.expand(n_video), vision_noisy_frame_indexes=[torch.arange(frames)], return_dict=False,
        )

    return _family("cosmos3_omni", model, (1, 4, frames, 2 * grid, 2 * grid), (cond, uncond), inputs,
                   pick=lambda out: out[0][0])


def sana_wm() -> SupportFamily:
    """SANA-WM: camera-controlled world model; per-frame timesteps [B, 1, T] with the first frame the
    clean anchor (timestep 0), text [B, 1, L, D], a camera trajectory (flat c2w + intrinsics per frame)
    and Plucker rays. Gated-delta-net (linear attention) block then softmax block; the short
    temporal convolutions, zero at construction, get random weights so that branch is live."""
    torch.manual_seed(0)
    model = diffusers.SanaWMTransformer3DModel(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1), softmax_every_n=2,
        linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4, caption_channels=32, mlp_ratio=2.0,
        chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2, mixed_precision="fp32",
    )
    from diffusers.models.transformers.transformer_sana_wm import SanaWMTemporalShortConvolution

    g = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, SanaWMTemporalShortConvolution):
            module.weight.data = torch.randn(module.weight.shape, generator=g) * 0.1
    frames, size = 4, 4
    c2w = torch.eye(4).repeat(1, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames, dtype=torch.float32) * 0.1
    camera = torch.cat([c2w.flatten(-2), torch.tensor([size, size, size / 2, size / 2.0]).expand(1, frames, 4)], dim=-1)
    plucker = _fixed(1, 8, frames, size, size, seed=4)
    anchor = torch.ones(frames)
    anchor[0] = 0
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long)
    cond, uncond = _conditions(32)

    def inputs(x, t, e):
        b = x.shape[0]
        return dict(
            hidden_states=x, timestep=(anchor * t).expand(b, 1, frames), encoder_hidden_states=e[:, None],
            encoder_attention_mask=mask.expand(b, -1), camera_conditions=camera.expand(b, -1, -1),
            chunk_plucker=plucker.expand(b, -1, -1, -1, -1), return_dict=False,
        )

    return _family("sana_wm", model, (1, 4, frames, size, size), (cond, uncond), inputs)


def sana_wm_refiner() -> SupportFamily:
    """SANA-WM stage-2 refiner (LTX-2 blocks, video only), chunk-causal: the first AR block (latent
    frames 1-2, tokens [B, N, C], a timestep per token) attends to the attention-sink K/V captured
    from frame 0 (`kv_cache_mode="inject"`). Each branch's cache is captured with its own prompt when
    the model is built and travels in the branch's context."""
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    torch.manual_seed(0)
    model = diffusers.SanaWMLTX2RefinerTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=32,
        rope_double_precision=False,
    ).eval()
    size, fps = 4, 24.0
    mask = torch.ones(1, TEXT_LEN)

    def rope(frames):
        return model.build_rotary_emb_for_absolute_positions(
            batch_size=1, frame_positions=frames, height=size, width=size, device=torch.device("cpu"), fps=fps
        )

    sink = _fixed(1, size * size, 8, seed=3)

    def fill(text):
        cache = SanaWMRefinerKVCache(2)
        with torch.no_grad():
            model(
                hidden_states=sink, encoder_hidden_states=text, timestep=torch.zeros(1, size * size),
                video_rotary_emb=rope([0]), encoder_attention_mask=mask, kv_cache=cache,
                kv_cache_mode="capture_pre_rope", return_dict=False,
            )
        for i in range(2):
            cache.get(i).store_sink(*cache.get(i).get_captured_pre_rope())
        cache.sink_pe = rope([0])
        return cache

    cond, uncond = _conditions(32)
    conditions = (
        dict(encoder_hidden_states=cond, kv_cache=fill(cond)), dict(encoder_hidden_states=uncond, kv_cache=fill(uncond))
    )
    active = rope([1, 2])
    n = 2 * size * size

    def inputs(x, t, e):
        return dict(
            hidden_states=x, timestep=t.reshape(1, 1).expand(x.shape[0], n), video_rotary_emb=active,
            encoder_attention_mask=mask, kv_cache_mode="inject", return_dict=False, **e,
        )

    return _family("sana_wm_refiner", model, (1, n, 8), conditions, inputs)

CASES: list[Case] = [
    Case("WanTransformer3DModel", "WanTransformer3DModel", wan),
    Case("WanTransformer3DModel (Wan 2.2 TI2V, per-token timestep)", "WanTransformer3DModel", wan22_ti2v),
    Case("ChronoEditTransformer3DModel", "ChronoEditTransformer3DModel", chronoedit),
    Case("SkyReelsV2Transformer3DModel", "SkyReelsV2Transformer3DModel", skyreels_v2),
    Case(
        "SkyReelsV2Transformer3DModel (diffusion forcing, per-frame timestep)", "SkyReelsV2Transformer3DModel",
        skyreels_v2_df,
    ),
    Case("WanVACETransformer3DModel", "WanVACETransformer3DModel", wan_vace),
    Case("AnyFlowTransformer3DModel", "AnyFlowTransformer3DModel", anyflow),
    Case("AnyFlowFARTransformer3DModel", "AnyFlowFARTransformer3DModel", anyflow_far),
    Case("HeliosTransformer3DModel", "HeliosTransformer3DModel", helios),
    Case("CogVideoXTransformer3DModel", "CogVideoXTransformer3DModel", cogvideox),
    Case("ConsisIDTransformer3DModel", "ConsisIDTransformer3DModel", consisid),
    Case("AllegroTransformer3DModel", "AllegroTransformer3DModel", allegro),
    Case("LatteTransformer3DModel", "LatteTransformer3DModel", latte),
    Case("SanaVideoTransformer3DModel", "SanaVideoTransformer3DModel", sana_video),
    Case("SanaWMTransformer3DModel", "SanaWMTransformer3DModel", sana_wm),
    Case("SanaWMLTX2RefinerTransformer3DModel", "SanaWMLTX2RefinerTransformer3DModel", sana_wm_refiner),
    Case("CosmosTransformer3DModel", "CosmosTransformer3DModel", cosmos),
    Case("Cosmos3OmniTransformer", "Cosmos3OmniTransformer", cosmos3_omni),
    Case("LTXVideoTransformer3DModel", "LTXVideoTransformer3DModel", ltx),
    Case("LTX2VideoTransformer3DModel", "LTX2VideoTransformer3DModel", ltx2),
    Case("MochiTransformer3DModel", "MochiTransformer3DModel", mochi),
    Case("MochiTransformer3DModel (capture_dynamic_output_shape_ops)", "MochiTransformer3DModel", mochi,
         dynamo=(("capture_dynamic_output_shape_ops", True),)),
    Case("EasyAnimateTransformer3DModel", "EasyAnimateTransformer3DModel", easyanimate),
    Case("HunyuanVideoTransformer3DModel", "HunyuanVideoTransformer3DModel", hunyuan_video),
    Case("HunyuanVideoFramepackTransformer3DModel", "HunyuanVideoFramepackTransformer3DModel", hunyuan_framepack),
    Case("HunyuanVideo15Transformer3DModel", "HunyuanVideo15Transformer3DModel", hunyuan_video15),
    Case("MotifVideoTransformer3DModel", "MotifVideoTransformer3DModel", motif_video),
    Case("Kandinsky5Transformer3DModel", "Kandinsky5Transformer3DModel", kandinsky5),
    Case("Kandinsky6Transformer3DModel", "Kandinsky6Transformer3DModel", kandinsky6),
    Case("Kandinsky6SRTransformer3DModel", "Kandinsky6SRTransformer3DModel", kandinsky6_sr),
    Case("JoyImageEditTransformer3DModel", "JoyImageEditTransformer3DModel", joyimage_edit),
    Case("JoyImageEditPlusTransformer3DModel", "JoyImageEditPlusTransformer3DModel", joyimage_edit_plus),
    Case("MiniMaxH3Transformer3DModel", "MiniMaxH3Transformer3DModel", minimax_h3),
    Case("WanAnimateTransformer3DModel", "WanAnimateTransformer3DModel", wan_animate),
    Case("WanAnimate2Transformer3DModel", "WanAnimate2Transformer3DModel", wan_animate_2),
]
