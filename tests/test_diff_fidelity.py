"""DIFF's behaviours pinned on small inputs against what its code does (Yux1angJi/DIFF, files and
lines cited in each test): the inversion schedule and its off-by-one, the trajectory update,
the mask-blended guided update, the features of its passes, the finecoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import config, fusion_config, head_config, tiny_model

from pipeline.core.classes import IGNORE_INDEX
from pipeline.core.errors import ConfigError
from pipeline.diffusion.features import multi_pass_features, unet_features
from pipeline.diffusion.inversion import Inversion, ddim_update, invert, invert_guided, region_masks
from pipeline.diffusion.taps import resolve_taps
from pipeline.heads.fusion import DiffFinecoder
from pipeline.heads.model import SegModel
from pipeline.loops.invert import InvertConfig

DIFF_37 = [
    160,
    139,
    121,
    105,
    91,
    80,
    69,
    60,
    52,
    45,
    40,
    34,
    30,
    26,
    23,
    22,
    21,
    20,
    19,
    18,
    17,
    16,
    15,
    14,
    13,
    12,
    11,
    10,
    9,
    8,
    7,
    6,
    5,
    4,
    3,
    2,
    1,
]
SAVE_37 = [33, 29, 25, 22, 18, 14, 11, 7, 3]  # diff_config.yaml: save_timestep


def inversion(schedule, eta=1.0, guidance=5.0, prediction="epsilon") -> Inversion:
    return Inversion(tuple(schedule), eta, 10, 250, guidance, prediction)


def test_unet_timesteps_of_diffs_schedules() -> None:
    """generalized_steps (diffusion.py:106-125): seq = flip(timesteps); inversion iterates
    t over seq_next = [0] + seq[:-1] towards seq; features of step i are saved at t_i."""
    five = inversion([80, 60, 40, 20, 1])
    assert five.unet_timesteps() == [0, 1, 20, 40, 60]  # save_timestep [4, 3, 2, 1, 0]
    assert [five.unet_timesteps()[i] for i in [4, 3, 2, 1, 0]] == [60, 40, 20, 1, 0]
    full = inversion(DIFF_37)
    assert [full.unet_timesteps()[i] for i in SAVE_37] == [91, 52, 30, 22, 18, 14, 11, 7, 3]
    assert full.steps[0] == (0, 1) and full.steps[-1] == (139, 160)
    assert full.unet_timesteps().index(52) == 29
    with pytest.raises(ConfigError, match="descending"):
        config("invert", InvertConfig, schedule=[1, 20, 40])


def _diff_reference(model, x, schedule, eta, noises, guidance=5.0):
    """DIFF's inversion loop as its code writes it (diffusion.py:102-291, plain path, prompt ""
    and negative prompt "", the output read as epsilon), transcribed step for step."""
    seq = sorted(schedule)
    seq_next = [0] + seq[:-1]
    b = model.scheduler.betas
    xs, inputs = x, []
    ctx = torch.zeros(0)
    for i, (t, next_t) in enumerate(zip(seq_next, seq, strict=True)):
        at = (1 - b).cumprod(dim=0)[t]
        at_next = (1 - b).cumprod(dim=0)[next_t]
        inputs.append(xs)
        et = model.unet(xs, torch.tensor([t] * xs.shape[0]), _plain(model, xs)).sample
        et = et + guidance * (et - et)  # CFG between two identical "" passes
        eta_t = eta if 10 < t < 250 else 0.0
        a_skip = at_next / at  # t < next_t
        x0_t = (xs - et * (1 - at).sqrt()) / at.sqrt()
        c1 = eta_t * ((1 - a_skip) * (1 - at_next) / (1 - at)).sqrt()
        c2 = torch.max((1 - at_next) - c1**2, torch.tensor(1e-10)).sqrt()
        xs = at_next.sqrt() * x0_t + c1 * noises[i] + c2 * et
    return torch.stack(inputs), ctx


def _plain(model, x):
    from pipeline.diffusion.text import encode_text  # noqa: PLC0415

    return encode_text(model, [""]).expand(x.shape[0], -1, -1)


@torch.no_grad()
def test_plain_trajectory_equals_diffs_loop() -> None:
    model = tiny_model(prediction_type="epsilon")
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 16)
    schedule = [240, 160, 80, 20, 5, 1]  # steps at t = 0, 1, 5, 20, 80, 160
    noises = [torch.randn(2, 4, 8, 16) for _ in schedule]
    plain = _plain(model, x0[:1])
    ours = invert(model, x0, inversion(schedule), plain, plain, lambda i, p: noises[i])
    ref, _ = _diff_reference(model, x0, schedule, 1.0, noises)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # eta only inside (10, 250): the steps at t = 0, 1, 5 ignore their noise.
    other = [n if i >= 3 else torch.randn_like(n) for i, n in enumerate(noises)]
    again = invert(model, x0, inversion(schedule), plain, plain, lambda i, p: other[i])
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_v_prediction_is_read_properly_unless_asked() -> None:
    model = tiny_model()  # v-prediction, as SD-2.1
    x = torch.randn(1, 4, 8, 16)
    out = torch.randn_like(x)
    noise = torch.zeros_like(x)
    as_eps = ddim_update(model, x, out, 20, 40, 0.0, noise, "epsilon")
    proper = ddim_update(model, x, out, 20, 40, 0.0, noise, "model")
    a, a_next = model.scheduler.alphas_cumprod[20], model.scheduler.alphas_cumprod[40]
    x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    torch.testing.assert_close(proper, a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps)
    assert not torch.allclose(as_eps, proper, atol=1e-3)


@torch.no_grad()
def test_guided_update_blends_prompt_updates_over_the_masks() -> None:
    """do_mask_steps (diffusion.py:172-198, 269-285): per prompt an update with its own noise,
    the plain one over the whole image, averaged where masks overlap."""
    model = tiny_model(prediction_type="epsilon")
    torch.manual_seed(1)
    x0 = torch.randn(1, 4, 8, 16)
    label = torch.full((64, 128), IGNORE_INDEX)
    label[:, :64] = 1  # sidewalk on the left half, nothing labeled on the right
    (mask,) = region_masks(label, [1], (8, 16))
    assert mask[0, 0, :, :8].eq(1).all() and mask[0, 0, :, 8:].eq(0).all()
    plain = _plain(model, x0)[:1]
    sidewalk = torch.randn(1, 77, 16)
    noises = {(i, p): torch.randn(1, 4, 8, 16) for i in range(2) for p in range(2)}
    inv = inversion([40, 20], eta=1.0, guidance=5.0)
    prompts = [(plain, torch.ones(1, 1, 8, 16)), (sidewalk, mask)]
    xs = invert_guided(model, x0, inv, plain, prompts, lambda i, p: noises[(i, p)])
    # By hand, step 0 (t 0 -> 20): outputs under "" and the class prompt, CFG, two updates.
    t = torch.tensor([0])
    out_u = model.unet(x0, t, plain).sample
    out_s = model.unet(x0, t, sidewalk).sample
    u_plain = ddim_update(model, x0, out_u, 0, 20, 0.0, noises[(0, 0)], "epsilon")
    guided = out_u + 5.0 * (out_s - out_u)
    u_side = ddim_update(model, x0, guided, 0, 20, 0.0, noises[(0, 1)], "epsilon")
    want = torch.where(mask.bool(), (u_plain + u_side) / 2, u_plain)
    torch.testing.assert_close(xs[1], want, atol=1e-5, rtol=1e-5)
    # Where no class prompt applies the guided trajectory follows the plain update only.
    plain_only = invert(model, x0, inv, plain, plain, lambda i, p: noises[(i, 0)])
    torch.testing.assert_close(xs[1][..., 8:], plain_only[1][..., 8:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_passes_give_resnets_from_the_first_and_attention_summed() -> None:
    """collect_stride_feats_with_timesteplist (diffusion.py:364-392): ResNet features of the
    first (unconditional) batch chunk, cross-attention features summed over prompt passes."""
    model = tiny_model()
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    x = torch.randn(2, 4, 8, 16)
    plain, other = torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    feats = multi_pass_features(model, x, 50, [plain, plain, other], taps)
    a = unet_features(model, x, 50, plain, taps)
    b = unet_features(model, x, 50, other, taps)
    for tap in taps:
        want = 2 * a[tap.name] + b[tap.name] if tap.tokens else a[tap.name]
        torch.testing.assert_close(feats[tap.name], want, atol=1e-5, rtol=1e-5)
    assert sum(t.tokens for t in taps) == 9 and sum(not t.tokens for t in taps) == 12


def test_finecoder_shapes_and_strides_reaching_the_head() -> None:
    """DIFF's finecoder (finecoder.py:158-190) with its widths (diff_config.yaml:9-10): 1/64
    is dropped, 1/8..1/32 GroupNormed, 1/4 built top-down; the head gets [x4, x8, x16, x32]."""
    specs = {
        f"t{t}/up{b}_{k}{j}": [c, s]
        for t in (91, 3)
        for b, (c, s) in enumerate([(40, 64), (40, 32), (24, 16), (16, 8)])
        for k in ("res", "attn")
        for j in range(3)
        if not (b == 0 and k == "attn")
    }
    widths = [256, 512, 1024, 2048]
    fusion = DiffFinecoder(fusion_config(kind="diff", inputs=specs, widths=widths))
    assert fusion.out_specs == [(256, 4), (512, 8), (1024, 16), (2048, 32)]
    assert sorted(fusion.bottleneck) == ["16", "32", "8"]  # no 1/64 bottleneck at all
    assert fusion.bottleneck["32"].conv1.in_channels == 40 * 6 * 2  # 3 res + 3 attn, 2 t
    assert fusion.bottleneck["8"].norm1.num_groups == 16 and fusion.norm["8"].num_groups == 32
    assert [type(m).__name__ for m in (fusion.up["4"], fusion.refine["4"])] == [
        "ConvTranspose2d",
        "ResBlock",
    ]
    assert fusion.up["4"].kernel_size == (4, 4) and fusion.up["4"].padding == (1, 1)
    # Channel order within a stride: ResNets then attentions, timesteps from the noisiest.
    assert fusion.keys_by_stride[32][:3] == ["t91/up1_res0", "t3/up1_res0", "t91/up1_res1"]
    feats = {k: torch.randn(1, c, 128 // s, 256 // s) for k, (c, s) in specs.items()}
    outs = fusion(feats)
    assert [tuple(o.shape[1:]) for o in outs] == [
        (256, 32, 64),
        (512, 16, 32),
        (1024, 8, 16),
        (2048, 4, 8),
    ]
    # The 1/8..1/32 maps the head gets are the normalized bottleneck outputs themselves.
    x8 = fusion.norm["8"](
        fusion.bottleneck["8"](torch.cat([feats[k] for k in fusion.keys_by_stride[8]], 1))
    )
    torch.testing.assert_close(outs[1], x8)
    model = SegModel(
        fusion_config(kind="diff", inputs=specs, widths=[32, 32, 64, 64]), head_config(norm="bn")
    )
    assert model(feats).shape == (1, 19, 32, 64)


def test_diff_inputs_drop_the_coarsest_stride() -> None:
    from pipeline.loops.train import TrainConfig, diff_inputs  # noqa: PLC0415

    specs = {"t1/a": (4, 64), "t1/b": (4, 32), "t1/c": (4, 8)}
    assert diff_inputs(config("train", TrainConfig, fusion="diff"), specs) == {
        "t1/b": (4, 32),
        "t1/c": (4, 8),
    }
    assert diff_inputs(config("train", TrainConfig), specs) == specs


def test_noise_of_a_trajectory_is_seeded_per_image() -> None:
    from pipeline.loops.invert import _noise  # noqa: PLC0415

    a = _noise(["x", "y"], (4, 2, 2), "plain", 0, 0)(3, 0)
    b = _noise(["y"], (4, 2, 2), "plain", 0, 0)(3, 0)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(_noise(["y"], (4, 2, 2), "plain", 1, 0)(3, 0), b)
    assert np.isfinite(a.numpy()).all()
