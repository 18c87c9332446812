"""The SDXL denoising UNet with Stability's (sgm) structure and parameter names.

``UNetModel(**network_config.params)`` has the parameters of an official single-file checkpoint
under ``model.diffusion_model.`` one to one (``input_blocks.*``, ``middle_block.*``,
``output_blocks.*``, ``time_embed.*``, ``label_emb.*``, ``out.*``), so loading one needs no renames.
Source: Stability-AI/generative-models ``sgm/modules/diffusionmodules/openaimodel.py`` (the
subset SDXL uses: 2-D, no scale-shift norm, no up/down-sampling ResBlocks, spatial transformers).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from mindspore import Tensor, nn, ops

from gm.modules.attention import SpatialTransformer, dropout_cell
from gm.modules.diffusionmodules.util import timestep_embedding, zero_module
from gm.modules.layers import Conv2d, Embedding, GroupNorm, Identity, Linear, SiLU
from gm.modules.pynative_jit import PyNativeCompilable


def _norm(channels: int, groups: int = 32) -> GroupNorm:
    return GroupNorm(groups, channels, eps=1e-5)


class ResBlock(PyNativeCompilable, nn.Cell):
    """Residual block conditioned on the timestep embedding.

    ``in_layers`` = [GroupNorm, SiLU, conv3x3], ``emb_layers`` = [SiLU, Linear],
    ``out_layers`` = [GroupNorm, SiLU, dropout, conv3x3], ``skip_connection`` = Identity or 1x1 conv.
    ``zero_init_output`` starts ``out_layers.3`` at zero (sgm): a fresh block adds nothing to its skip path.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: Optional[int] = None,
                 use_checkpoint: bool = False, zero_init_output: bool = True, norm_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.SequentialCell([
            _norm(channels, norm_groups), SiLU(), Conv2d(channels, out_channels, 3, padding=1)])
        self.emb_layers = nn.SequentialCell([SiLU(), Linear(emb_channels, out_channels)])
        out_conv = Conv2d(out_channels, out_channels, 3, padding=1)
        self.out_layers = nn.SequentialCell([
            _norm(out_channels, norm_groups), SiLU(), dropout_cell(dropout),
            zero_module(out_conv) if zero_init_output else out_conv,
        ])
        self.skip_connection = Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        if use_checkpoint:
            self.recompute()  # activations are recomputed in the backward pass (sgm's `checkpoint`)

    def construct(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C, H, W); emb: (B, emb_channels) -> (B, out_channels, H, W)."""
        # the norm -> SiLU pairs as one op each (GroupNorm.with_silu); the layers keep sgm's indices
        h = self.in_layers[2](self.in_layers[0].with_silu(x))
        emb_out = self.emb_layers[1](self.emb_layers[0](emb))  # (B, out_channels); not via the SequentialCell's loop
        h = h + emb_out.reshape(emb_out.shape[0], -1, 1, 1)
        h = self.out_layers[3](self.out_layers[2](self.out_layers[0].with_silu(h)))
        return self.skip_connection(x) + h


class Downsample(nn.Cell):
    """Stride-2 3x3 convolution ``op`` (halves H and W)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.op = Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""
        return self.op(x)


class Upsample(nn.Cell):
    """Nearest-neighbour x2 upsampling followed by the 3x3 convolution ``conv``."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C_out, 2H, 2W)."""
        b, c, h, w = x.shape
        # one broadcast + reshape: 4x faster on CPU than ops.interpolate(mode="nearest"), same values
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class TimestepEmbedSequential(PyNativeCompilable, nn.SequentialCell):
    """A sequence whose ResBlocks get the timestep embedding and transformers get the context.

    One UNet level; with ``--pynative_jit`` it runs as one compiled graph in PyNative mode."""

    def construct(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, H, W); emb: (B, E); context: (B, L, D)."""
        for layer in self.cell_list:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _per_level(value: Union[int, Sequence[int]], levels: int, name: str) -> list:
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"UNetModel: {name}={value} needs one entry per level of channel_mult ({levels})")
    return value


class UNetModel(nn.Cell):
    """The SDXL UNet: eps (or v) prediction for latents ``x`` at ``timesteps`` given ``context`` and ``y``.

    Args (as in sgm's network_config): ``in_channels``/``out_channels`` latent channels;
    ``model_channels`` base width; ``channel_mult`` width multiplier per level; ``num_res_blocks``
    ResBlocks per level; ``attention_resolutions`` downsampling factors (1, 2, 4, ...) whose level
    has spatial transformers; ``transformer_depth`` blocks per transformer (int or one per level;
    the middle block uses ``transformer_depth_middle``, default the last level's);
    ``num_head_channels`` width per head (or ``num_heads`` heads); ``context_dim`` cross-attention
    width; ``num_classes``: None, ``"sequential"`` (the vector ``y`` of width ``adm_in_channels``
    through an MLP ``label_emb``) or an int (class ids through an embedding);
    ``use_linear_in_transformer`` linear (SDXL) vs 1x1-conv transformer projections;
    ``use_checkpoint`` recomputes ResBlock and transformer-block activations in backward;
    ``spatial_transformer_attn_type`` is accepted for sgm-config compatibility (same math);
    ``zero_init_residual_outputs`` (default True, sgm's init) starts ResBlock ``out_layers.3``,
    transformer ``proj_out`` and ``out.2`` at zero. False keeps their ordinary random init: needed
    when LoRA is trained on a randomly initialised base (with zeroed outputs every LoRA gradient is 0).
    ``norm_num_groups`` (default 32, SDXL's; diffusers' ``norm_num_groups``) groups of every GroupNorm.
    At SDXL's width the first level has 10 channels per group; a narrow model at 32 groups has one,
    and its GroupNorms become instance norms that erase each channel's mean, so the network cannot
    reproduce the noise's per-channel mean and its x0 estimate at high noise is off by ~sigma^2 / (H*W).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_classes: Union[None, int, str] = None,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: Union[int, Sequence[int]] = 1,
        transformer_depth_middle: Optional[int] = None,
        context_dim: Optional[int] = None,
        use_linear_in_transformer: bool = False,
        adm_in_channels: Optional[int] = None,
        legacy: bool = True,
        spatial_transformer_attn_type: str = "softmax",
        zero_init_residual_outputs: bool = True,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels (SDXL: num_head_channels: 64)")
        if context_dim is None:
            raise ValueError("UNetModel: context_dim is required (the width of the text embeddings, SDXL: 2048)")
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):
            raise ValueError(f"UNetModel: spatial_transformer_attn_type={spatial_transformer_attn_type!r}; "
                             "use 'softmax' or 'softmax-xformers'")
        levels = len(channel_mult)
        depth = _per_level(transformer_depth, levels, "transformer_depth")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.channel_mult = tuple(channel_mult)
        self.attention_resolutions = tuple(attention_resolutions)
        self.transformer_depth = tuple(depth)
        self.num_classes = num_classes
        self._block_args = dict(dropout=dropout, use_checkpoint=use_checkpoint, num_heads=num_heads,
                                num_head_channels=num_head_channels, legacy=legacy, context_dim=context_dim,
                                use_linear=use_linear_in_transformer, zero_init=zero_init_residual_outputs,
                                norm_groups=norm_num_groups)
        time_embed_dim = model_channels * 4
        self.time_embed = nn.SequentialCell([
            Linear(model_channels, time_embed_dim), SiLU(), Linear(time_embed_dim, time_embed_dim)])
        self.label_emb = self._label_embedding(num_classes, adm_in_channels, time_embed_dim)

        self.input_blocks, skip_channels, ch = self._build_input_blocks(time_embed_dim, depth)
        middle_depth = depth[-1] if transformer_depth_middle is None else transformer_depth_middle
        self.middle_block = TimestepEmbedSequential([
            self._resblock(ch, time_embed_dim, ch), self._transformer(ch, middle_depth),
            self._resblock(ch, time_embed_dim, ch),
        ])
        self.output_blocks, ch = self._build_output_blocks(time_embed_dim, depth, skip_channels, ch)
        out_conv = Conv2d(model_channels, out_channels, 3, padding=1)
        self.out = nn.SequentialCell([
            _norm(ch, norm_num_groups), SiLU(), zero_module(out_conv) if zero_init_residual_outputs else out_conv])

    @staticmethod
    def _label_embedding(num_classes, adm_in_channels, time_embed_dim) -> Optional[nn.Cell]:
        if num_classes is None:
            return None
        if num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError("UNetModel: num_classes='sequential' needs adm_in_channels (SDXL base: 2816)")
            return nn.SequentialCell([nn.SequentialCell([
                Linear(adm_in_channels, time_embed_dim), SiLU(), Linear(time_embed_dim, time_embed_dim)])])
        if isinstance(num_classes, int) and not isinstance(num_classes, bool):
            return Embedding(num_classes, time_embed_dim)
        raise ValueError(f"UNetModel: num_classes={num_classes!r}; use None, 'sequential' or an int")

    def _resblock(self, channels: int, emb_channels: int, out_channels: int) -> ResBlock:
        args = self._block_args
        return ResBlock(channels, emb_channels, args["dropout"], out_channels, args["use_checkpoint"],
                        zero_init_output=args["zero_init"], norm_groups=args["norm_groups"])

    def _transformer(self, ch: int, depth: int) -> SpatialTransformer:
        args = self._block_args
        if args["num_head_channels"] == -1:
            heads, dim_head = args["num_heads"], ch // args["num_heads"]
        else:
            heads, dim_head = ch // args["num_head_channels"], args["num_head_channels"]
        if args["legacy"]:
            dim_head = ch // heads
        return SpatialTransformer(ch, heads, dim_head, depth, args["context_dim"], args["dropout"],
                                  args["use_linear"], args["use_checkpoint"], zero_init_output=args["zero_init"],
                                  norm_groups=args["norm_groups"])

    def _build_input_blocks(self, emb_dim: int, depth: list):
        blocks = [TimestepEmbedSequential([Conv2d(self.in_channels, self.model_channels, 3, padding=1)])]
        skip_channels = [self.model_channels]
        ch, ds = self.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [self._resblock(ch, emb_dim, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch, depth[level]))
                blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2
        return nn.CellList(blocks), skip_channels, ch

    def _build_output_blocks(self, emb_dim: int, depth: list, skip_channels: list, ch: int):
        skip_channels = list(skip_channels)
        ds = 2 ** (len(self.channel_mult) - 1)
        blocks = []
        for level in reversed(range(len(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                out_ch = self.channel_mult[level] * self.model_channels
                layers = [self._resblock(ch + skip_channels.pop(), emb_dim, out_ch)]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch, depth[level]))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(layers))
        return nn.CellList(blocks), ch

    def construct(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Predict the network output (eps for SDXL base).

        Args:
            x: (B, in_channels, H, W) latents, H and W divisible by 2**(levels-1).
            timesteps: (B,) diffusion timesteps (float or int).
            context: (B, L, context_dim) cross-attention tokens.
            y: (B, adm_in_channels) vector conditioning (``num_classes='sequential'``) or (B,) class ids.
        Returns:
            (B, out_channels, H, W).
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (B, 4*model_channels)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        index = len(skips)
        for block in self.output_blocks:
            index = index - 1
            h = block(ops.concat([h, skips[index]], axis=1), emb, context)
        return self.out[2](self.out[0].with_silu(h))
