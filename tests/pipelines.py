"""Real diffusers video pipelines at tiny random-weight configs, built offline: the text encoders
are left out (`tokenizer=None, text_encoder=None`) and the prompt embeddings, pooled embeddings
and attention masks a pipeline needs are passed in their place. Each pipeline gets the smallest
VAE its constructor takes, so its latent geometry and decoding are the real code paths.

Each builder returns (pipeline, the keyword arguments of its call); `PROMPT_ARGUMENTS` names the
ones that belong to a prompt rather than to the generation setting.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    LTX2Pipeline,
    LTXPipeline,
    UniPCMultistepScheduler,
    WanPipeline,
)
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

from tests import support_models
from tests.models import wan
from tests.support_models import TEXT_LEN


def prompt_arguments(inputs: dict) -> tuple[dict, dict]:
    """(the arguments of a prompt, the rest): embeddings and masks of the prompt and the negative prompt."""
    prompt = {k: v for k, v in inputs.items() if "prompt" in k}
    return prompt, {k: v for k, v in inputs.items() if k not in prompt}


def _mask(valid: int, left: bool = False) -> torch.Tensor:
    """A text attention mask with `valid` tokens and padding after them (before them with `left`, as
    Gemma's tokenizer pads): real prompts are padded, so the masks reach the attention."""
    mask = torch.zeros(1, TEXT_LEN)
    if left:
        mask[:, TEXT_LEN - valid:] = 1
    else:
        mask[:, :valid] = 1
    return mask


def _small_wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )


def hunyuan_video():
    """Double- then single-stream joint text-video attention; true CFG as two calls per step
    (`true_cfg_scale` and a negative prompt) besides the embedded guidance."""
    family = support_models.hunyuan_video()
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, vae=vae, transformer=family.model,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    cond, uncond = family.conditions
    return pipe, dict(
        prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
        prompt_attention_mask=_mask(6), negative_prompt_embeds=uncond["encoder_hidden_states"],
        negative_pooled_prompt_embeds=uncond["pooled_projections"], negative_prompt_attention_mask=_mask(3),
        true_cfg_scale=4.0, guidance_scale=6.0, height=64, width=64, num_frames=9,
    )


def cogvideox():
    """Dual-stream joint attention; CFG batched (uncond and cond in one call of batch 2), the RoPE
    tables made by the pipeline; the released models' DDIM v-prediction scheduler."""
    family = support_models.cogvideox()
    vae = AutoencoderKLCogVideoX(latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4)
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=family.model, scheduler=scheduler)
    cond, uncond = family.conditions
    return pipe, dict(
        prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=6.0, height=64, width=64, num_frames=9
    )


def wan22_a14b():
    """Wan 2.2 A14B: `transformer` denoises the high-noise steps, `transformer_2` (other weights) the
    low-noise ones, each at its own guidance scale. With shift 3 the 4 timesteps are 1000, 858, 602
    and 9, so `boundary_ratio` 0.7 (timestep 700) gives each transformer two steps."""
    high, low = wan(seed=0), wan(seed=1)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=_small_wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=high.model, transformer_2=low.model, boundary_ratio=0.7,
    )
    cond, uncond = high.conditions
    return pipe, dict(
        prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=4.0, guidance_scale_2=3.0, height=64,
        width=64, num_frames=9,
    )


def ltx2():
    """LTX2Pipeline itself: it builds offline. Gemma is left out (its stacked hidden states, 2 layers
    of 32 here, are the prompt embeddings), and the text connectors, video VAE and audio VAE are tiny
    (the audio VAE's 2 latent channels x 4 mel bins give the transformer's 8 audio channels). CFG
    only, batched in one call per step: STG and modality isolation (`stg_scale`, `modality_scale`)
    call the transformer again with other Python arguments, that is other graphs, which this file
    does not check."""
    family = support_models.ltx2()
    connectors = LTX2TextConnectors(
        caption_channels=32, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=16, video_connector_num_layers=1,
        video_connector_num_learnable_registers=TEXT_LEN, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=16, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=TEXT_LEN, rope_double_precision=False,
    )
    vae = AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 3,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 4, spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    audio_vae = AutoencoderKLLTX2Audio(base_channels=8, num_res_blocks=1, latent_channels=2, mel_bins=16)
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=None, tokenizer=None,
        connectors=connectors, transformer=family.model, vocoder=None,
    )
    text = torch.randn(1, TEXT_LEN, 64, generator=torch.Generator().manual_seed(1))
    return pipe, dict(
        prompt_embeds=text, prompt_attention_mask=_mask(6, left=True), negative_prompt_embeds=torch.zeros_like(text),
        negative_prompt_attention_mask=_mask(3, left=True), guidance_scale=4.0, stg_scale=0.0, audio_stg_scale=0.0,
        modality_scale=1.0, audio_modality_scale=1.0, height=128, width=128, num_frames=17,
    )



def wan_unipc():
    """WanPipeline as Wan 2.1 ships it: the UniPC multistep sampler on flow sigmas (shift 3), CFG as
    two calls per step."""
    family = wan()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_small_wan_vae(), scheduler=scheduler,
                       transformer=family.model)
    cond, uncond = family.conditions
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=5.0, height=64, width=64,
                      num_frames=9)


def ltx_video():
    """LTXPipeline (LTX-Video): latents packed as tokens [B, N, C], CFG batched in one call."""
    family = support_models.ltx()
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, patch_size=1,
        spatial_compression_ratio=8, temporal_compression_ratio=8,
    )
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=family.model)
    cond, uncond = family.conditions
    return pipe, dict(
        prompt_embeds=cond, prompt_attention_mask=_mask(6), negative_prompt_embeds=uncond,
        negative_prompt_attention_mask=_mask(3), guidance_scale=3.0, height=64, width=64, num_frames=9,
    )


WORDS = ("a", "red", "blue", "green", "ball", "cube", "moves", "left", "right", "slowly", "fast", "on", "grass")


def wan_with_text():
    """WanPipeline with its text encoder: a tiny random UMT5 and a word-level tokenizer built in
    memory (the real classes, nothing downloaded), so that it takes prompts as strings. Words
    outside `WORDS` read as the unknown token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=16)
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8)).eval()
    pipe, setting = wan_unipc()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                       transformer=pipe.transformer)
    return pipe, {**prompt_arguments(setting)[1], "max_sequence_length": 16}
