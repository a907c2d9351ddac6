"""
The Stable Diffusion 1.5 architecture as runwayml/stable-diffusion-v1-5 publishes it: the config.json of its
UNet, VAE and CLIP text encoder, in diffusers' / transformers' format. With these, an SD 1.5-sized model (random
weights) needs no download:

    unet = UNet(UNetConfig.from_diffusers(sd15.UNET))        # 859.5M parameters

The tests build diffusers / transformers references of this size from them, and the benchmarks compare
against diffusers at this size.
"""

UNET = dict(  # unet/config.json
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)

VAE = dict(  # vae/config.json
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, out_channels=3, sample_size=512, up_block_types=["UpDecoderBlock2D"] * 4,
)

TEXT_ENCODER = dict(  # text_encoder/config.json
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2,
    hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0, initializer_range=0.02,
    intermediate_size=3072, layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model",
    num_attention_heads=12, num_hidden_layers=12, pad_token_id=1, projection_dim=768, torch_dtype="float32",
    transformers_version="4.22.0.dev0", vocab_size=49408,
)
