"""DIFF's own code (github.com/Yux1angJi/DIFF), transcribed as it is written so tests can pin the
project against it on small inputs. Each function names its file and lines; only the plumbing
around the lines (kwargs, logging, unused branches) is left out. Do not "fix" anything here.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

# mmseg/models/backbones/diff/configs/diff_config.yaml:62-81 (the uncommented label_map)
LABEL_MAP = {
    1: "A high quality photo; europe city; sidewalk, Paths for pedestrian use",
    3: "A high quality photo; europe city; wall, Outer walls of buildings or structures",
    12: "A high quality photo; europe city; rider, People riding bicycles, motorcycles",
    14: "A high quality photo; europe city; truck, Larger vehicles used for cargo transport",
    16: "A high quality photo; europe city; train, Vehicles on railway tracks",
}


def masked_inversion(
    unet,
    betas,
    x,
    schedule,
    eta,
    uncond,
    prompt,
    class_embs,
    masks,
    guidance,
    noises,
    s_tmin=10,
    s_tmax=250,
):
    """generalized_steps with run_inversion and do_mask_steps (stable_diffusion/diffusion.py:
    102-291), batch 1: x_i of every step. `class_embs` and `masks` are the present classes'
    (label_map order of torch.unique), `noises[i]` the (P, C, h, w) randn_like(et) of step i."""
    seq = sorted(schedule)
    seq_next = [0] + seq[:-1]
    batch_size, x_c, x_h, x_w = x.shape
    tmask = torch.ones((x_h, x_w), dtype=x.dtype)
    # :172-191: the all-ones mask of the prompt, then one per present class
    all_masks = torch.cat([torch.ones((1, batch_size, 1, x_h, x_w), dtype=x.dtype), *masks])
    prompt_cnt = 1 + len(class_embs)
    text_embedding = torch.cat([uncond, prompt, *class_embs], dim=0)  # :192-194
    xs, out = x, []
    for i, (t, next_t) in enumerate(zip(seq_next, seq, strict=True)):
        t = torch.ones(1) * t
        next_t = torch.ones(1) * next_t
        at = (1 - betas).cumprod(dim=0).index_select(0, t.long())
        at_next = (1 - betas).cumprod(dim=0).index_select(0, next_t.long())
        at, at_next = at[:, None, None, None], at_next[:, None, None, None]
        xt = xs
        out.append(xt)
        # :229-236
        xt_input = xt.repeat(prompt_cnt + 1, 1, 1, 1)
        et = unet(
            xt_input.to(unet.dtype), t.to(unet.dtype), encoder_hidden_states=text_embedding
        ).sample
        et_uncond = et[:batch_size, ...].repeat(prompt_cnt, 1, 1, 1)
        et_text = et[batch_size:, ...]
        et = et_uncond + guidance * (et_text - et_uncond)
        # :258-267
        eta_t = eta if (t > s_tmin and t < s_tmax) else 0.0
        a_skip = at / at_next if t > next_t else at_next / at
        # :269-285
        xts = xt.repeat(prompt_cnt, 1, 1, 1)
        x0_ts = (xts - et * (1 - at).sqrt()) / at.sqrt()
        c1 = eta_t * ((1 - a_skip) * (1 - at_next) / (1 - at)).sqrt()
        c2 = torch.max((1 - at_next) - (c1 * tmask) ** 2, torch.Tensor([1e-10]))[0].sqrt()
        xts_next = at_next.sqrt() * x0_ts + c1 * tmask * noises[i] + c2 * et
        value = (
            (xts_next * all_masks.view(prompt_cnt * batch_size, 1, x_h, x_w))
            .view(prompt_cnt, batch_size, x_c, x_h, x_w)
            .sum(dim=0)
        )
        count = all_masks.sum(dim=0)
        xs = torch.where(count > 0, value / count, value)
    return torch.stack(out)


def mask_of(label, cls, size, dtype=torch.float32):
    """diffusion.py:176-182: one class's mask, nearest-resized to the latent, as DIFF stacks it."""
    mask = (label == cls).to(dtype=dtype)[None, None]
    return F.interpolate(mask, size=size, mode="nearest")[None]


def c2_msra_fill(module: nn.Module) -> None:
    """detectron2's weight_init.c2_msra_fill (archs/detectron2/resnet.py:208-210 calls it)."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def weights_init(m: nn.Module) -> None:
    """finecoder.py:183-190 and aggregation_network.py:281-292 (the same function)."""
    if isinstance(m, nn.Conv2d) or isinstance(m, nn.ConvTranspose2d):
        init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            init.constant_(m.bias, 0)
    elif isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.GroupNorm):
        init.constant_(m.weight, 1)
        init.constant_(m.bias, 0)


class ConvNorm(nn.Module):
    """detectron2's Conv2d with a norm (archs/detectron2: conv, then norm)."""

    def __init__(self, cin, cout, k, groups_norm, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.norm = nn.GroupNorm(groups_norm, cout)

    def forward(self, x):
        return self.norm(self.conv(x))


class BottleneckBlock(nn.Module):
    """archs/detectron2/resnet.py:125-250, norm GN (stride 1, no in_gn in forward)."""

    def __init__(self, in_channels, out_channels, bottleneck_channels, num_norm_groups):
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, num_norm_groups)
            if in_channels != out_channels
            else None
        )
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, num_norm_groups)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, num_norm_groups, 1)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, num_norm_groups)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + shortcut)


class ResBlock(nn.Module):
    """finecoder.py:112-131."""

    def __init__(self, in_channels, out_channels, num_groups=32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.gn1 = nn.GroupNorm(num_groups, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.gn2 = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x):
        residual = x
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        out += residual
        return self.relu(out)


class EnhancedFeatureFusion(nn.Module):
    """finecoder.py:133-144."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(
            in_channels, out_channels, kernel_size=4, stride=2, padding=1
        )
        self.resblock = ResBlock(out_channels, out_channels)

    def forward(self, x1, x2=None):
        x1 = self.deconv(x1)
        if x2 is not None:
            x1 = x1 + x2
        return self.resblock(x1)


class DiftStrideFinecoder(nn.Module):
    """finecoder.py:147-190 (EnhancedFusionNetwork, :160-168, inlined as fusion1..3)."""

    def __init__(self, in_channels, hidden_dim_x4, num_group=32):
        super().__init__()
        in_channels = in_channels[1:] + [hidden_dim_x4]
        self.fusion1 = EnhancedFeatureFusion(in_channels[0], in_channels[1])
        self.fusion2 = EnhancedFeatureFusion(in_channels[1], in_channels[2])
        self.fusion3 = EnhancedFeatureFusion(in_channels[2], hidden_dim_x4)
        self.gn_x8 = nn.GroupNorm(num_group, in_channels[2])
        self.gn_x16 = nn.GroupNorm(num_group, in_channels[1])
        self.gn_x32 = nn.GroupNorm(num_group, in_channels[0])
        self.apply(weights_init)

    def forward(self, x8, x16, x32):
        x8, x16, x32 = self.gn_x8(x8), self.gn_x16(x16), self.gn_x32(x32)
        x = self.fusion1(x32, x16)
        x = self.fusion2(x, x8)
        x4 = self.fusion3(x)
        return x4, x8, x16, x32


def random_crop_bbox(img_shape, crop_size, randint):
    """mmseg RandomCrop.get_crop_bbox (datasets/pipelines/transforms.py:515-524)."""
    margin_h = max(img_shape[0] - crop_size[0], 0)
    margin_w = max(img_shape[1] - crop_size[1], 0)
    offset_h = randint(0, margin_h + 1)
    offset_w = randint(0, margin_w + 1)
    return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]


def random_crop(seg, crop_size, cat_max_ratio, randint, ignore_index=255):
    """mmseg RandomCrop.__call__ (transforms.py:532-560): the box it keeps."""
    crop_bbox = random_crop_bbox(seg.shape, crop_size, randint)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = crop_bbox
            seg_temp = seg[y1:y2, x1:x2]
            labels, cnt = np.unique(seg_temp, return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            crop_bbox = random_crop_bbox(seg.shape, crop_size, randint)
    return crop_bbox


def rare_class_source_sample(seg, c, crop_size, cat_max_ratio, min_pixels, min_crop_ratio, randint):
    """DAFormer's get_rare_class_source_sample (datasets/uda_dataset.py:128-144) for a chosen
    class and image: the crop it ends on (self.source[i1] re-runs the pipeline's RandomCrop)."""
    box = random_crop(seg, crop_size, cat_max_ratio, randint)
    if min_crop_ratio > 0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            n_class = np.sum(seg[y1:y2, x1:x2] == c)
            if n_class > min_pixels * min_crop_ratio:
                break
            box = random_crop(seg, crop_size, cat_max_ratio, randint)
    return box


def photo_metric_distortion(img, random):
    """mmseg PhotoMetricDistortion.__call__ (transforms.py:779-884) on a BGR uint8 image, with
    mmcv's bgr2hsv / hsv2bgr (cv2) and `random` standing for numpy.random."""

    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    if random.randint(2):  # brightness
        img = convert(img, beta=random.uniform(-32, 32))
    mode = random.randint(2)
    if mode == 1 and random.randint(2):  # contrast
        img = convert(img, alpha=random.uniform(0.5, 1.5))
    if random.randint(2):  # saturation
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(0.5, 1.5))
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if random.randint(2):  # hue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-18, 18)) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if mode == 0 and random.randint(2):  # contrast
        img = convert(img, alpha=random.uniform(0.5, 1.5))
    return img


def imrescale(img, scale):
    """mmcv.imrescale (mmcv/image/geometric.py, rescale_size and _scale_size) as mmseg's Resize
    calls it with keep_ratio (DIFF: img_scale (1280, 720)): cv2 bilinear, sizes int(x + 0.5)."""
    h, w = img.shape[:2]
    scale_factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_size = int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)
    return cv2.resize(img, new_size, interpolation=cv2.INTER_LINEAR)


def mmseg_decode_loss(seg_logit, seg_label, ignore_index=255):
    """BaseDecodeHead.losses (decode_head.py:230-247) with CrossEntropyLoss
    (cross_entropy_loss.py:11-33) and weight_reduce_loss (losses/utils.py:48-77): logits
    resized bilinearly (align_corners False) to the label, per-pixel CE with ignored pixels 0,
    then loss.mean() over every pixel (no avg_factor)."""
    seg_logit = F.interpolate(seg_logit, size=seg_label.shape[2:], mode="bilinear")
    seg_label = seg_label.squeeze(1)
    loss = F.cross_entropy(seg_logit, seg_label, reduction="none", ignore_index=ignore_index)
    return loss.mean()


def mmcv_conv_module_init(conv: nn.Module, norm: nn.Module | None) -> None:
    """mmcv ConvModule.init_weights: kaiming_init(conv) with its defaults (a 0, fan_out, relu,
    normal, bias 0), constant_init(norm, 1, bias=0)."""
    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)
    if norm is not None:
        nn.init.constant_(norm.weight, 1)
        nn.init.constant_(norm.bias, 0)
