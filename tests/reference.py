"""The reference implementation (diffusers + transformers on torch, CPU) built from our YAML numbers.

Each builder reads the same config our model is built from and returns the torch model with the
equivalent diffusers/transformers configuration, with random weights from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "inference" / "sd_xl_tiny.yaml"
BASE_CONFIG = REPO / "configs" / "inference" / "sd_xl_base.yaml"


def model_params(config_path: Path = TINY_CONFIG):
    return OmegaConf.load(config_path).model.params


def _emb_params(config_path: Path, index: int):
    return model_params(config_path).conditioner_config.params.emb_models[index].params


def unet_config(config_path: Path = TINY_CONFIG) -> dict:
    """diffusers UNet2DConditionModel config equivalent to our network_config."""
    p = model_params(config_path).network_config.params
    channels = [p.model_channels * m for m in p.channel_mult]
    has_attn = [2**level in p.attention_resolutions for level in range(len(channels))]
    return dict(
        sample_size=128,
        in_channels=p.in_channels,
        out_channels=p.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        block_out_channels=tuple(channels),
        layers_per_block=p.num_res_blocks,
        transformer_layers_per_block=tuple(p.transformer_depth),
        # diffusers' SDXL config stores the number of heads under attention_head_dim
        attention_head_dim=tuple(c // p.num_head_channels for c in channels),
        cross_attention_dim=p.context_dim,
        use_linear_projection=p.use_linear_in_transformer,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=p.adm_in_channels,
        norm_num_groups=p.get("norm_num_groups", 32),
        upcast_attention=False,
    )


def vae_config(config_path: Path = TINY_CONFIG) -> dict:
    """diffusers AutoencoderKL config equivalent to our first_stage_config."""
    p = model_params(config_path)
    dd = p.first_stage_config.params.ddconfig
    n = len(dd.ch_mult)
    return dict(
        in_channels=dd.in_channels,
        out_channels=dd.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(dd.ch * m for m in dd.ch_mult),
        layers_per_block=dd.num_res_blocks,
        latent_channels=dd.z_channels,
        norm_num_groups=dd.get("norm_num_groups", 32),
        sample_size=dd.resolution,
        scaling_factor=p.scale_factor,
        force_upcast=False,
    )


def clip_l_config(config_path: Path = TINY_CONFIG) -> dict:
    """transformers CLIPTextConfig for text_encoder (CLIP ViT-L/14 text at our width)."""
    e = _emb_params(config_path, 0)
    return dict(
        vocab_size=49408, hidden_size=e.width, intermediate_size=e.intermediate_size,
        num_hidden_layers=e.layers, num_attention_heads=e.heads, max_position_embeddings=77,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def open_clip_g_config(config_path: Path = TINY_CONFIG) -> dict:
    """transformers CLIPTextConfig for text_encoder_2 (OpenCLIP ViT-bigG/14 text at our width)."""
    e = _emb_params(config_path, 1)
    return dict(
        vocab_size=49408, hidden_size=e.width, intermediate_size=4 * e.width,
        num_hidden_layers=e.layers, num_attention_heads=e.heads, max_position_embeddings=77,
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=e.embed_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def build_unet(config_path: Path = TINY_CONFIG, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**unet_config(config_path))
    _randomize_(model, seed)
    return model.eval()


def build_vae(config_path: Path = TINY_CONFIG, seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**vae_config(config_path))
    _randomize_(model, seed)
    return model.eval()


def build_clip_l(config_path: Path = TINY_CONFIG, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**clip_l_config(config_path)))
    _randomize_(model, seed)
    return model.eval()


def build_open_clip_g(config_path: Path = TINY_CONFIG, seed: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**open_clip_g_config(config_path)))
    _randomize_(model, seed)
    return model.eval()


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter so that zero-initialised parts (diffusers zeroes conv_out,
    proj_out, ...) and unit norms do not hide a wrong wiring in the parity tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# -- the DreamBooth paper's evaluation models, small (head width 64, as the real ones) ----------------------------

EVAL_IMAGE_SIZE = 32  # patch 8: 16 patches + the class token
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_eval_clip(folder: Path, seed: int = 0):
    """A small CLIPModel with its image processor saved as a transformers folder; returns the model."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1, "intermediate_size": 96,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 160, "image_size": EVAL_IMAGE_SIZE, "patch_size": 8},
        projection_dim=48)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": EVAL_IMAGE_SIZE},
                          crop_size={"height": EVAL_IMAGE_SIZE, "width": EVAL_IMAGE_SIZE}).save_pretrained(folder)
    return model


def write_eval_dino(folder: Path, seed: int = 0):
    """A small ViTModel (DINO's architecture) with dino-vits16's kind of processor config; returns the model."""
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=160,
                       image_size=EVAL_IMAGE_SIZE, patch_size=8)
    model = ViTModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessorPil(size=EVAL_IMAGE_SIZE, resample=2, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD).save_pretrained(folder)
    return model
