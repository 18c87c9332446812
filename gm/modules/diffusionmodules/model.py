"""The KL autoencoder's encoder and decoder (SDXL's VAE), with Stability's ``sgm`` parameter names.

Layout and names follow ``sgm.modules.diffusionmodules.model`` (the official single-file keys
``first_stage_model.encoder.down.0.block.0.norm1.weight`` ... are our parameter names), math
follows the same module: GroupNorm(32, eps 1e-6), SiLU, ResNet blocks without a time embedding,
single-head spatial self-attention with 1x1-conv projections, a downsample that pads
right/bottom by one before a stride-2 3x3 conv, a nearest x2 upsample followed by a 3x3 conv.

Speed on the CPU target (every training image is encoded there): GroupNorm and the 3x3
convolutions run through ``gm.modules.cpu_kernels`` (about 1.3x faster encode than
``ops.group_norm`` + unfold im2col at 256x256; the native kernels elsewhere); the attention's
q/k/v run as one (3C, C) matmul with the 1/sqrt(C) scale folded into the q weights, and its
transposes are matmul flags, so nothing but the two products and the softmax touches the
(HW, HW) matrix.
"""

from __future__ import annotations

from typing import Sequence

from mindspore import Tensor, nn, ops

from gm.modules.cpu_kernels import GroupNormFunction, conv3x3_same, pad_right_bottom, weight_matmul
from gm.modules.layers import Conv2d, GroupNorm, Identity, on_cpu_target, optional

VAE_NORM_EPS = 1e-6  # sgm's Normalize(); not GroupNorm's default 1e-5


# From this many elements per sample on, group_norm_2d beats ops.group_norm on the CPU target
# (measured: 0.7 vs 1.4 ms at (128, 32, 32), 23 vs 68 ms at (128, 256, 256)); below, its ops cost more.
_FAST_NORM_MIN_ELEMENTS = 128 * 32 * 32


class _GroupNorm(GroupNorm):
    """layers.GroupNorm computed by ``cpu_kernels.group_norm_2d`` on the CPU target for large inputs
    (with its true gradients, for VAE training: ``cpu_kernels.GroupNormFunction``)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__(num_groups, num_channels, eps=eps)
        # our compiled kernel (layers.GroupNorm's `native`), where built, beats both
        self.fast = GroupNormFunction(num_groups, eps) if on_cpu_target() and self.native is None else None

    def construct(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.fast is not None and x.shape[1] * x.shape[2] * x.shape[3] >= _FAST_NORM_MIN_ELEMENTS:
            return self.fast(x, self.weight, self.bias)
        return super().construct(x)


# From this many pixels on, conv3x3_same beats unfold im2col on the CPU target (measured: ~1.3x
# at 128 channels and 256x256, less temporary memory); below it, its extra ops cost more.
_ROWS_CONV_MIN_PIXELS = 64 * 64


class _Conv3x3(Conv2d):
    """layers.Conv2d (3x3, stride 1, padding 1), computed by ``cpu_kernels.conv3x3_same`` on the CPU
    target for large images when our compiled kernel (``native_conv``) is not there."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        if self.native is None and self.im2col and x.shape[2] * x.shape[3] >= _ROWS_CONV_MIN_PIXELS:
            return conv3x3_same(x, self.weight, self.bias)
        return super().construct(x)


def normalize(channels: int, groups: int = 32) -> GroupNorm:
    """The VAE's normalisation layer: GroupNorm with ``groups`` groups (SDXL: 32) and eps 1e-6."""
    return _GroupNorm(groups, channels, VAE_NORM_EPS)


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """1x1 convolution of ``x`` (B, I, L) with ``weight`` (O, I) and ``bias`` (O,) -> (B, O, L)."""
    return ops.bias_add(weight_matmul(weight, x), bias)


class ResnetBlock(nn.Cell):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus the (projected) input.

    Args:
        in_channels, out_channels: channel counts; a 1x1 ``nin_shortcut`` projects the input when
            they differ (sgm's ``conv_shortcut=False`` case, the only one SDXL uses).
        dropout: dropout probability between the convolutions (active only in training mode).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalize(in_channels, norm_groups)
        self.conv1 = _Conv3x3(in_channels, out_channels)
        self.norm2 = normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else Identity()
        self.conv2 = _Conv3x3(out_channels, out_channels)
        self.has_shortcut = in_channels != out_channels
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1) if self.has_shortcut else Identity()

    def construct(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        h = self.conv1(self.norm1.with_silu(x))
        h = self.conv2(self.dropout(self.norm2.with_silu(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all H*W positions, with 1x1-conv q/k/v/proj_out, residual."""

    def __init__(self, in_channels: int, norm_groups: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.norm = normalize(in_channels, norm_groups)
        self.q = Conv2d(in_channels, in_channels, 1)
        self.k = Conv2d(in_channels, in_channels, 1)
        self.v = Conv2d(in_channels, in_channels, 1)
        self.proj_out = Conv2d(in_channels, in_channels, 1)
        self.scale = in_channels ** -0.5
        self.matmul_ta = ops.BatchMatMul(transpose_a=True)
        self.matmul_tb = ops.BatchMatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        h = self.norm(x).reshape(b, c, height * width)  # (B, C, L)
        # one (3C, C) matmul instead of three; the score scale rides on the q projection
        w_qkv = ops.cat((self.q.weight.reshape(c, c) * self.scale, self.k.weight.reshape(c, c),
                         self.v.weight.reshape(c, c)), 0)
        b_qkv = ops.cat((self.q.bias * self.scale, self.k.bias, self.v.bias), 0)
        qkv = _pointwise(h, w_qkv, b_qkv)  # (B, 3C, L)
        q, k, v = ops.split(qkv, c, axis=1)  # each (B, C, L)
        # transposes as matmul flags: a swapaxes would copy the (L, L) matrix
        weights = ops.softmax(self.matmul_ta(q, k), axis=-1)  # (B, L_q, L_k)
        out = self.matmul_tb(v, weights)  # (B, C, L_q)
        out = _pointwise(out, self.proj_out.weight.reshape(c, c), self.proj_out.bias)
        return x + out.reshape(b, c, height, width)


class Downsample(nn.Cell):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 conv with stride 2 (sgm's layout)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(pad_right_bottom(x))


class Upsample(nn.Cell):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = _Conv3x3(in_channels, in_channels)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        b, c, h, w = x.shape
        # nearest x2 as one broadcast: each pixel becomes a 2x2 patch
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class _Level(nn.Cell):
    """One resolution level: ``block`` (ResnetBlocks) and ``attn`` (AttnBlocks, usually empty)."""

    def __init__(self, blocks: list, attns: list):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList(attns)
        self.has_attn = bool(attns)

    def _blocks(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.has_attn:
                x = self.attn[i](x)
        return x


class _DownLevel(_Level):
    """Encoder level: blocks, then ``downsample`` (an Identity on the last level)."""

    def __init__(self, blocks: list, attns: list, downsample: nn.Cell | None):
        super().__init__(blocks, attns)
        self.downsample = optional(downsample)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) on the last level."""
        return self.downsample(self._blocks(x))


class _UpLevel(_Level):
    """Decoder level: blocks, then ``upsample`` (an Identity on level 0)."""

    def __init__(self, blocks: list, attns: list, upsample: nn.Cell | None):
        super().__init__(blocks, attns)
        self.upsample = optional(upsample)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C_in, h, w) -> (B, C_out, 2h, 2w), or (B, C_out, h, w) on level 0."""
        return self.upsample(self._blocks(x))


class _Mid(nn.Cell):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def construct(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return self.block_2(self.attn_1(self.block_1(x)))


def _check_attn_type(attn_type: str, use_linear_attn: bool) -> None:
    if attn_type != "vanilla" or use_linear_attn:
        raise ValueError(f"attn_type='{attn_type}', use_linear_attn={use_linear_attn}: only the vanilla "
                         "attention of SDXL's VAE is implemented; set attn_type: vanilla")


class Encoder(nn.Cell):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2^(len(ch_mult)-1).

    Args follow sgm's ``ddconfig``: ``ch`` base width, ``ch_mult`` width per level,
    ``num_res_blocks`` per level, ``attn_resolutions`` resolutions (relative to ``resolution``)
    that get attention after each block, ``double_z`` to output mean and logvar; ``norm_num_groups``
    (an extension, diffusers' name; SDXL: 32) the groups of every GroupNorm (see the UNet's).
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        out_ch: int | None = None,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        _check_attn_type(attn_type, use_linear_attn)
        if not resamp_with_conv:
            raise ValueError("resamp_with_conv=False (average-pool downsampling) is not used by SDXL; set it True")
        del out_ch  # part of the shared ddconfig, used by the decoder only
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = _Conv3x3(in_channels, ch)
        in_mult = (1,) + tuple(ch_mult)
        levels = []
        res = resolution
        block_in = ch
        for i in range(self.num_resolutions):
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            last = i == self.num_resolutions - 1
            levels.append(_DownLevel(blocks, attns, None if last else Downsample(block_in)))
            if not last:
                res //= 2
        self.down = nn.CellList(levels)
        self.mid = _Mid(block_in, dropout, norm_num_groups)
        self.norm_out = normalize(block_in, norm_num_groups)
        self.conv_out = _Conv3x3(block_in, 2 * z_channels if double_z else z_channels)

    def construct(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, 2*z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out.with_silu(h))


class Decoder(nn.Cell):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    ``up`` is indexed by level like the encoder (``up.0`` is the full-resolution level) but run
    from the last level to the first; each level has ``num_res_blocks + 1`` blocks.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int | None = None,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        double_z: bool = True,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        _check_attn_type(attn_type, use_linear_attn)
        if not resamp_with_conv:
            raise ValueError("resamp_with_conv=False is not used by SDXL; set it True")
        del in_channels, double_z  # part of the shared ddconfig, used by the encoder only
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = _Conv3x3(z_channels, block_in)
        self.mid = _Mid(block_in, dropout, norm_num_groups)
        levels = [None] * self.num_resolutions
        for i in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            levels[i] = _UpLevel(blocks, attns, Upsample(block_in) if i != 0 else None)
            if i != 0:
                res *= 2
        self.up = nn.CellList(levels)
        self.norm_out = normalize(block_in, norm_num_groups)
        self.conv_out = _Conv3x3(block_in, out_ch)

    def construct(self, z: Tensor) -> Tensor:
        """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f)."""
        h = self.mid(self.conv_in(z))
        for i in range(self.num_resolutions - 1, -1, -1):
            h = self.up[i](h)
        if self.give_pre_end:
            return h
        h = self.conv_out(self.norm_out.with_silu(h))
        if self.tanh_out:
            h = ops.tanh(h)
        return h
