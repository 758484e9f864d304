"""Tiny random-weight instances of every model family interplab hooks into.

Each builder writes its config in code, seeds torch, and returns a model in ``eval()``
mode whose forward pass takes well under a second on one CPU thread. Nothing is
downloaded. Tests use them to check that hook points and anatomy names exist and
behave; the ``tiny`` profile's trained zoo has the same shapes.

    gpt2()       transformers GPT2LMHeadModel     2 layers, d=32, 4 heads, vocab 64
    llama()      transformers LlamaForCausalLM    2 layers, d=32, 4 heads (2 kv), vocab 64
    phi3()       transformers Phi3ForCausalLM     2 layers, d=32, 4 heads (2 kv), fused qkv, vocab 64
    clip()       transformers CLIPModel           text+vision, width 64, 2 layers, image 32, patch 8
    clip_text()  transformers CLIPTextModel       the text tower of ``clip()``
    unet()       diffusers UNet2DConditionModel   channels (32, 64), cross_attention_dim 32, 16 px latents
    timm_vit()   timm VisionTransformer           depth 2, d=192, image 32, patch 8
    timm_swin()  timm SwinTransformer             2 stages x (2, 2) blocks, image 32, patch 2, window 4
    open_clip()  open_clip.model.CLIP             width 64, 2 layers per tower, image 32, patch 8
    stable_diffusion()  models.diffusion.StableDiffusion  SD-v1's UNet topology at width 32, CLIP-L's text
                 width (768) with 1 layer, a one-level VAE, 8 x 8 latents, the toy world's 24-token tokenizer
    stable_diffusion_xl()  models.diffusion.StableDiffusionXL  SD-XL's topology at width 32, two 3-layer towers
                 (width 32), 8 x 8 latents, 64 px size ids, OpenAI's BPE at 77 tokens
    deepfloyd_if()  models.diffusion.DeepFloydIF  IF stage I's topology at width 32, 8 x 8 pixels, a 2-layer T5
    deepfloyd_if_stage_2(stage_1)  models.diffusion.DeepFloydIFStageII  IF stage II's topology at width 16, 8 -> 32
                 pixels, stage I's T5
    pixart_alpha()  models.diffusion.PixArtAlpha  PixArt-alpha's DiT (2 blocks, 2 heads of 12), a 2-layer T5 of width 32,
                 8 x 8 latents, OpenAI's BPE at 16 tokens
    stable_diffusion_3()  models.diffusion.StableDiffusion3  SD3's MMDiT (2 joint blocks, 2 heads of 8), CLIP-L / CLIP-G
                 / T5 towers of width 16 / 24 / 64, a 16-channel VAE, 8 x 8 latents
    flux()       models.diffusion.Flux  FLUX.1-dev's transformer (1 double, 1 single block, 2 heads of 8), CLIP-L / T5
                 towers of width 16 / 32, a 16-channel VAE, 8 x 8 latents (16 tokens)
"""
import torch

SEED = 0
VOCAB = 64          # small vocabularies keep embeddings tiny; special ids live inside them
BOS, EOS, PAD = 1, 2, 0


def _ready(model):
    return model.eval()


def gpt2(n_layer: int = 2, seed: int = SEED):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=n_layer, n_head=4,
                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                     attn_implementation="eager")
    return _ready(GPT2LMHeadModel(cfg))


def llama(n_layer: int = 2, seed: int = SEED):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                      attn_implementation="eager")
    return _ready(LlamaForCausalLM(cfg))


def phi3(n_layer: int = 2, seed: int = SEED):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     original_max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                     pad_token_id=PAD, attn_implementation="eager")
    return _ready(Phi3ForCausalLM(cfg))


def _clip_configs():
    from transformers import CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                          bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    return text, vision


def clip(seed: int = SEED):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text, vision = _clip_configs()
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32,
                     attn_implementation="eager")
    return _ready(CLIPModel(cfg))


def clip_text(seed: int = SEED):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text, _ = _clip_configs()
    text._attn_implementation = "eager"
    return _ready(CLIPTextModel(text))


def unet(seed: int = SEED):
    """Two resolution levels, cross-attention in the first down, the mid and the last up block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _ready(UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    ))


def timm_vit(seed: int = SEED):
    import timm

    torch.manual_seed(seed)
    return _ready(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                    depth=2, num_classes=10))


def timm_swin(seed: int = SEED):
    import timm

    torch.manual_seed(seed)
    return _ready(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                                    patch_size=2, window_size=4, embed_dim=32, depths=(2, 2),
                                    num_heads=(2, 4), num_classes=10))


def open_clip(seed: int = SEED):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=16, vocab_size=VOCAB, width=64, heads=4, layers=2)
    return _ready(CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text))


def stable_diffusion(seed: int = SEED):
    from diffusers import AutoencoderKL

    from ..toyworld import clip_tokenizer
    from .diffusion import StableDiffusion, random_sd
    unet, text = random_sd("v1", width=32, text_layers=1, seed=seed)
    unet.config.sample_size = 8  # 8 x 8 latents: the real topology, a small canvas
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).eval()  # one level: latents = pixels
    return StableDiffusion(unet, text, clip_tokenizer(24), vae)


def stable_diffusion_xl(seed: int = SEED):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .diffusion import StableDiffusionXL, clip_bpe_tokenizer, sd_unet_config
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          max_position_embeddings=77, projection_dim=32)
    tower, tower_2 = CLIPTextModel(text).eval(), CLIPTextModelWithProjection(text).eval()
    cfg = sd_unet_config("xl", 32)
    cfg.update(sample_size=8, cross_attention_dim=64, addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=6 * 8 + 32)
    unet = UNet2DConditionModel(**cfg).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8).eval()
    tok = clip_bpe_tokenizer(77)
    return StableDiffusionXL(unet, tower, tok, vae, tower_2, tok, size=64)


def deepfloyd_if(seed: int = SEED, max_length: int = 16):
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from .diffusion import DeepFloydIF, clip_bpe_tokenizer, sd_unet_config
    torch.manual_seed(seed)
    cfg = sd_unet_config("if", 32)
    cfg.update(sample_size=8)
    unet = UNet2DConditionModel(**cfg).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=cfg["encoder_hid_dim"], d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4)).eval()
    return DeepFloydIF(unet, t5, clip_bpe_tokenizer(77), max_length=max_length)


def _tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=8,
                         sample_size=8, **extra).eval()


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=49408, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval()


def pixart_alpha(seed: int = SEED, use_additional_conditions: bool = False, max_length: int = 16):
    from diffusers import PixArtTransformer2DModel

    from .diffusion import PIXART_TRANSFORMER, PixArtAlpha, clip_bpe_tokenizer
    torch.manual_seed(seed)
    # width 24: the size conditioning of the 1024 model splits the width in three
    dit = PixArtTransformer2DModel(**dict(PIXART_TRANSFORMER, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                                          cross_attention_dim=24, caption_channels=32, sample_size=8,
                                          use_additional_conditions=use_additional_conditions)).eval()
    return PixArtAlpha(dit, _t5(32), clip_bpe_tokenizer(77), _tiny_vae(), max_length=max_length)


def stable_diffusion_3(seed: int = SEED, t5_length: int = 8):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .diffusion import SD3_TRANSFORMER, StableDiffusion3, clip_bpe_tokenizer
    torch.manual_seed(seed)
    towers = [CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=w, intermediate_size=2 * w,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         max_position_embeddings=77, projection_dim=w)).eval()
              for w in (16, 24)]
    dit = SD3Transformer2DModel(**dict(SD3_TRANSFORMER, sample_size=8, num_layers=2, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                                       pooled_projection_dim=16 + 24, pos_embed_max_size=16)).eval()
    tok = clip_bpe_tokenizer(77)
    vae = _tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609)
    return StableDiffusion3(dit, towers[0], tok, vae, towers[1], tok, _t5(64), tok, t5_length=t5_length)


def deepfloyd_if_stage_2(stage_1, seed: int = SEED):
    from diffusers import UNet2DConditionModel

    from .diffusion import DeepFloydIFStageII, sd_unet_config
    torch.manual_seed(seed)
    cfg = sd_unet_config("if-ii", 16)
    cfg.update(sample_size=32, encoder_hid_dim=stage_1.text_model.config.d_model, norm_num_groups=8)
    return DeepFloydIFStageII(UNet2DConditionModel(**cfg).eval(), stage_1.text_model, stage_1.tokenizer,
                              max_length=stage_1.max_length)


def flux(seed: int = SEED, t5_length: int = 8):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .diffusion import FLUX_TRANSFORMER, Flux, clip_bpe_tokenizer
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77)).eval()
    dit = FluxTransformer2DModel(**dict(FLUX_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                        axes_dims_rope=(2, 2, 4))).eval()
    vae = _tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159)
    tok = clip_bpe_tokenizer(77)
    return Flux(dit, clip, tok, vae, _t5(32), tok, size=8, t5_length=t5_length)
