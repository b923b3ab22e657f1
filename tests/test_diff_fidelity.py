"""DIFF's behaviours pinned on small inputs against what its code does (Yux1angJi/DIFF, files and
lines cited in each test; tests/_diff_reference.py transcribes the code compared against): the
inversion schedule and its off-by-one, the trajectory update (eta, noise, fp32), the
mask-blended guided path over several prompts and steps, its five class prompts, the features
of its passes, the finecoder's init and layers, mmseg's crops, flips, distortion and resize,
the decode loss's averaging, the DAFormer head's init, and the views' separate forwards."""

from __future__ import annotations

import copy

import _diff_reference as ref
import numpy as np
import pytest
import torch
from helpers import config, fusion_config, head_config, tiny_model

from pipeline.core.classes import IGNORE_INDEX
from pipeline.core.errors import ConfigError
from pipeline.data.augment import photometric_distortion
from pipeline.data.images import fit
from pipeline.data.sampling import rcs_crop
from pipeline.diffusion.inversion import Inversion, ddim_update, invert, invert_guided, region_masks
from pipeline.diffusion.prompts import DIFF_CLASS_PROMPTS
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.diffusion.unet_features import multi_pass_features, prompt_contexts, unet_features
from pipeline.heads.blocks import kaiming_fan_out
from pipeline.heads.decoders import build_head
from pipeline.heads.fusion import DiffFinecoder
from pipeline.heads.losses import ViewLoss, segmentation_ce, views_loss
from pipeline.heads.seg_model import SegModel
from pipeline.loops.invert import InvertConfig, _noise
from pipeline.loops.train import TrainConfig, diff_inputs

# diff_config.yaml: scheduler_timesteps
DIFF_37 = [160, 139, 121, 105, 91, 80, 69, 60, 52, 45, 40, 34, 30, 26, 23, *range(22, 0, -1)]
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
    xs = invert_guided(model, x0, inv, plain, [prompts], [lambda i, p: noises[(i, p)]])
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
    specs = {"t1/a": (4, 64), "t1/b": (4, 32), "t1/c": (4, 8)}
    assert diff_inputs(config("train", TrainConfig, fusion="diff"), specs) == {
        "t1/b": (4, 32),
        "t1/c": (4, 8),
    }
    assert diff_inputs(config("train", TrainConfig), specs) == specs


def test_noise_of_a_trajectory_is_seeded_per_image() -> None:
    a = _noise(["x", "y"], (4, 2, 2), "plain", 0, 0)(3, 0)
    b = _noise(["y"], (4, 2, 2), "plain", 0, 0)(3, 0)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(_noise(["y"], (4, 2, 2), "plain", 1, 0)(3, 0), b)
    assert np.isfinite(a.numpy()).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_guided_trajectory_over_several_prompts_and_noisy_steps_is_diffs(dtype) -> None:
    """do_mask_steps over six steps (three of them inside (10, 250), where eta 1 injects noise
    through c1), with the plain prompt and two class prompts of overlapping masks, against
    DIFF's loop (diffusion.py:162-291, transcribed in _diff_reference.masked_inversion); in
    fp16 as the recipe runs the UNet, the update in fp32 as DIFF's (its ᾱ are fp32)."""
    model = tiny_model(prediction_type="epsilon")
    model.unet.to(dtype)
    torch.manual_seed(3)
    x0 = torch.randn(1, 4, 8, 16).to(dtype)
    label = torch.full((64, 128), 0)
    label[:, :80] = 1  # sidewalk
    label[32:, 40:] = 12  # a rider over part of it
    size = (8, 16)
    plain = _plain(model, x0[:1]).to(dtype)
    classes = [1, 12]  # torch.unique order, both in DIFF's label_map
    embs = [torch.randn(1, 77, 16).to(dtype) for _ in classes]
    schedule = [240, 160, 80, 20, 5, 1]  # UNet at t = 0, 1, 5, 20, 80, 160
    noises = [torch.randn(3, 4, 8, 16) for _ in schedule]  # one per prompt and step
    inv = inversion(schedule, eta=1.0, guidance=5.0)
    masks = region_masks(label, classes, size)
    prompts = [(plain, torch.ones(1, 1, *size)), *zip(embs, masks, strict=True)]
    ours = invert_guided(model, x0, inv, plain, [prompts], [lambda i, p: noises[i][p : p + 1]])
    theirs = ref.masked_inversion(
        model.unet,
        model.scheduler.betas,
        x0.float(),
        schedule,
        1.0,
        plain,
        plain,
        embs,
        [ref.mask_of(label, c, size) for c in classes],
        5.0,
        noises,
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float(), atol=tol, rtol=tol)
    # The noise enters exactly at the steps inside (10, 250): t = 20, 80, 160.
    other = [n.clone() for n in noises]
    other[4] = torch.randn_like(other[4])  # the step at t = 80
    moved = invert_guided(model, x0, inv, plain, [prompts], [lambda i, p: other[i][p : p + 1]])
    torch.testing.assert_close(moved[:5], ours[:5])
    assert not torch.allclose(moved[5], ours[5], atol=1e-3)
    quiet = [n.clone() for n in noises]
    quiet[1] = torch.randn_like(quiet[1])  # t = 1: eta is 0 there
    torch.testing.assert_close(
        invert_guided(model, x0, inv, plain, [prompts], [lambda i, p: quiet[i][p : p + 1]]),
        ours,
    )


@torch.no_grad()
def test_the_ddim_update_runs_in_fp32_whatever_the_unet_runs_in() -> None:
    """DIFF's ᾱ are fp32 (diffusion.py:108, 212) and promote its update: in fp16, 1 - ᾱ at
    t <= 1 is ~15 % off, and x moves visibly differently."""
    model = tiny_model(prediction_type="epsilon")
    torch.manual_seed(0)
    x, out, noise = (torch.randn(1, 4, 8, 16) for _ in range(3))
    half = ddim_update(model, x.half(), out.half(), 0, 1, 0.0, noise.half(), "epsilon")
    full = ddim_update(model, x.half().float(), out.half().float(), 0, 1, 0.0, noise, "epsilon")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full)
    a = model.scheduler.alphas_cumprod
    assert abs(float((1 - a[1].half()).float() / (1 - a[1])) - 1) > 0.05  # fp16 would be off


def test_diffs_five_class_prompts_verbatim() -> None:
    """diff_config.yaml:62-81: only sidewalk, wall, rider, truck and train carry prompts, with
    these texts; the guided contexts are those texts encoded."""
    assert DIFF_CLASS_PROMPTS == ref.LABEL_MAP
    model = tiny_model()
    ctx = prompt_contexts(model, ["<guided-diff>"])
    assert sorted(ctx.diff) == sorted(ref.LABEL_MAP)
    with torch.no_grad():
        for c, text in ref.LABEL_MAP.items():
            torch.testing.assert_close(ctx.diff[c], encode_text(model, [text]))


def _diff_finecoder(widths, in_specs):
    """Our DIFF fusion and DIFF's own modules (reference) for the same inputs."""
    ours = DiffFinecoder(fusion_config(kind="diff", inputs=in_specs, widths=widths))
    by_stride = {s: sum(c for c, st in in_specs.values() if st == s) for s in (8, 16, 32)}
    w = dict(zip([4, 8, 16, 32], widths, strict=True))
    bottlenecks = {s: ref.BottleneckBlock(by_stride[s], w[s], w[s] // 4, 16) for s in (8, 16, 32)}
    fine = ref.DiftStrideFinecoder([w[32], w[32], w[16], w[8]], w[4])
    return ours, bottlenecks, fine


def _load_into_reference(ours, bottlenecks, fine) -> None:
    """Copy our weights into DIFF's modules, layer by layer (the names map one to one)."""
    sd = {}
    for s, b in bottlenecks.items():
        mine = ours.bottleneck[str(s)]
        pairs = [
            ("conv1", "conv1", "norm1"),
            ("conv2", "conv2", "norm2"),
            ("conv3", "conv3", "norm3"),
        ]
        for theirs, conv, norm in pairs:
            getattr(b, theirs).conv.weight.data = getattr(mine, conv).weight.data.clone()
            getattr(b, theirs).norm.load_state_dict(getattr(mine, norm).state_dict())
        b.shortcut.conv.weight.data = mine.shortcut[0].weight.data.clone()
        b.shortcut.norm.load_state_dict(mine.shortcut[1].state_dict())
    for s, gn in ((8, fine.gn_x8), (16, fine.gn_x16), (32, fine.gn_x32)):
        gn.load_state_dict(ours.norm[str(s)].state_dict())
    for fusion, s in ((fine.fusion1, 16), (fine.fusion2, 8), (fine.fusion3, 4)):
        fusion.deconv.load_state_dict(ours.up[str(s)].state_dict())
        r, mine = fusion.resblock, ours.refine[str(s)]
        for name in ("conv1", "gn1", "conv2", "gn2"):
            getattr(r, name).load_state_dict(getattr(mine, name).state_dict())
    return sd


@torch.no_grad()
def test_finecoder_equals_diffs_modules_layer_for_layer() -> None:
    """direct_aggregation (aggregation_network.py:226-307: a detectron2 bottleneck per stride,
    GroupNorm 16) + DiftStrideFinecoder (finecoder.py:112-190: GroupNorm 32 on x8..x32, three
    EnhancedFeatureFusion = ConvTranspose k4 s2 p1, + the finer map, ResBlock GN32): with the
    same weights, the same four maps."""
    specs = {
        f"t{t}/up{b}_{k}{j}": [c, s]
        for t in (91, 3)
        for b, (c, s) in enumerate([(40, 32), (24, 16), (16, 8)], start=1)
        for k in ("res", "attn")
        for j in range(3)
    }
    widths = [32, 64, 128, 256]
    ours, bottlenecks, fine = _diff_finecoder(widths, specs)
    _load_into_reference(ours, bottlenecks, fine)
    torch.manual_seed(0)
    feats = {k: torch.randn(2, c, 256 // s, 256 // s) for k, (c, s) in specs.items()}
    cat = {s: torch.cat([feats[k] for k in ours.keys_by_stride[s]], 1) for s in (8, 16, 32)}
    theirs = fine(*(bottlenecks[s](cat[s]) for s in (8, 16, 32)))
    for got, want in zip(ours(feats), theirs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_finecoder_init_is_diffs_weights_init() -> None:
    """DIFF initializes its aggregation and finecoder with weights_init (kaiming-normal fan-out
    for ReLU, biases 0, norms 1/0; finecoder.py:183-190) and its bottlenecks with c2_msra_fill,
    the same function: applied to our module under the same seed it gives our weights."""
    specs = {"t1/up1_res0": [16, 32], "t1/up2_res0": [16, 16], "t1/up3_res0": [16, 8]}
    ours = DiffFinecoder(fusion_config(kind="diff", inputs=specs, widths=[32, 32, 64, 64]))
    torch.manual_seed(5)
    kaiming_fan_out(ours)
    mine = {k: v.clone() for k, v in ours.state_dict().items()}
    torch.manual_seed(5)
    ours.apply(ref.weights_init)
    assert all(torch.equal(mine[k], v) for k, v in ours.state_dict().items())
    # ... and c2_msra_fill draws what weights_init draws for a bottleneck conv.
    conv = torch.nn.Conv2d(8, 16, 3, bias=False)
    torch.manual_seed(1)
    ref.c2_msra_fill(conv)
    a = conv.weight.clone()
    torch.manual_seed(1)
    ref.weights_init(conv)
    assert torch.equal(a, conv.weight)
    # The built module is initialized so: every conv weight's spread is kaiming fan-out's.
    built = DiffFinecoder(fusion_config(kind="diff", inputs=specs, widths=[256, 256, 512, 512]))
    up = built.up["4"].weight  # ConvTranspose (in, out, k, k): torch's fan-out is in * k * k
    assert float(up.std()) == pytest.approx((2 / (up.shape[0] * 16)) ** 0.5, rel=0.05)
    assert float(built.refine["4"].conv1.bias.abs().sum()) == 0


class _Numpy:
    """numpy.random as mmseg calls it, over a legacy RandomState; and the same stream as a
    numpy Generator's integers/uniform/random calls (what the project calls)."""

    def __init__(self, seed: int) -> None:
        self.rs = np.random.RandomState(seed)

    def randint(self, low, high=None):
        return self.rs.randint(low, high)

    def integers(self, low, high=None):
        return self.rs.randint(low, high)

    def uniform(self, low, high):
        return self.rs.uniform(low, high)

    def random(self):
        return self.rs.random_sample()


def test_random_crops_and_recrops_are_mmsegs_and_daformers() -> None:
    """RandomCrop with cat_max_ratio (transforms.py:502-568: a box, up to 10 checks, a new box
    after each failed one) and DAFormer's re-crops (uda_dataset.py:128-144): the same random
    stream gives the same box."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        label = np.zeros((40, 72), np.uint8)
        label[:, : int(rng.integers(8, 64))] = 10
        y, x = int(rng.integers(0, 30)), int(rng.integers(0, 60))
        label[y : y + 8, x : x + 10] = 12
        for ratio, c, wanted in ((0.75, None, 0.0), (1.0, 12, 30.0), (0.6, 12, 40.0)):
            ours = rcs_crop(_Numpy(trial), label, (40, 72), (24, 32), ratio, c, wanted)
            if c is None:
                y1, _, x1, _ = ref.random_crop(label, (24, 32), ratio, _Numpy(trial).randint)
            else:
                y1, _, x1, _ = ref.rare_class_source_sample(
                    label, c, (24, 32), ratio, 60, wanted / 60, _Numpy(trial).randint
                )
            assert ours == (y1, x1), (trial, ratio, c)


def test_photometric_distortion_is_mmsegs_hue_included() -> None:
    """PhotoMetricDistortion (transforms.py:779-884) on RGB through RGB<->HSV equals mmseg's on
    BGR: the same steps, probabilities and ranges (hue: numpy's randint(-18, 18), -18..17)."""
    img = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    for seed in range(60):
        ours = photometric_distortion(img, _Numpy(seed))
        theirs = ref.photo_metric_distortion(img[..., ::-1].copy(), _Numpy(seed))[..., ::-1]
        np.testing.assert_array_equal(ours, theirs)


def test_resize_is_mmcvs_imrescale() -> None:
    """mmseg's Resize(img_scale=(1280, 720)) keeps the ratio with mmcv.imrescale: cv2 bilinear
    (no antialiasing), sizes rounded int(x + 0.5). GTA's 1914x1052 becomes 1280x704."""
    img = np.random.default_rng(2).integers(0, 256, (1052, 1914, 3), dtype=np.uint8)
    theirs = ref.imrescale(img, (1280, 720))
    ours = fit(img, (704, 1280))
    assert theirs.shape == ours.shape == (704, 1280, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_cross_entropy_averages_over_every_pixel_as_mmseg() -> None:
    """DIFF's decode loss (decode_head.py:230-247 -> cross_entropy_loss.py:11-33 ->
    losses/utils.py:48-77): mean over all pixels, ignored ones counting 0; `valid` (ours, as an
    option) averages over the labeled pixels only."""
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 8, 16)
    label = torch.randint(0, 19, (2, 32, 64))
    label[:, :12] = IGNORE_INDEX  # 3/8 of the pixels ignored
    want = ref.mmseg_decode_loss(logits, label[:, None])
    torch.testing.assert_close(segmentation_ce(logits, label, "all"), want)
    valid = segmentation_ce(logits, label, "valid")
    torch.testing.assert_close(valid * 5 / 8, want)  # the same sum over 5/8 of the pixels


def test_daformer_head_init_is_mmcvs() -> None:
    """DAFormer's fusion layers are mmcv ConvModules (daformer_head.py:38-66, 86-101): their
    init_weights is kaiming_init (fan_out, relu, normal) and constant_init(norm, 1, 0); conv_seg
    is N(0, 0.01), bias 0 (decode_head.py:70-71); the MLP embeddings keep nn.Linear's default."""
    torch.manual_seed(0)
    cfg = head_config(kind="daformer", embed_dim=64, norm="bn")
    head = build_head([(96, 4), (96, 8), (96, 16), (96, 32)], cfg).requires_grad_(False)
    convs = [m for m in head.fuse.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in head.fuse.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 1 + 2 * 3 + 1  # 1x1, 3 separable (dw + pw), bottleneck
    for conv, norm in zip(convs, norms, strict=True):
        assert conv.bias is None  # ConvModule's bias="auto" with a norm
        reference = torch.nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups, bias=False
        )
        ref.mmcv_conv_module_init(reference, None)
        ratio = float(conv.weight.std() / reference.weight.std())
        assert 0.9 < ratio < 1.1, (conv, ratio)
        assert abs(float(conv.weight.mean())) < 0.1 * float(reference.weight.std())
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert 0.009 < float(head.classifier.weight.std()) < 0.011
    assert torch.equal(head.classifier.bias, torch.zeros_like(head.classifier.bias))
    for embed in head.embed:  # nn.Linear(96, 64)'s default: U(-1/sqrt(96), 1/sqrt(96))
        bound = 1 / 96**0.5
        assert float(embed.weight.abs().max()) <= bound
        assert 0.9 < float(embed.weight.std()) / (bound / 3**0.5) < 1.1


def test_views_are_separate_forwards_with_their_own_batch_statistics() -> None:
    """DIFF's guided and plain views are two forward passes (encoder_decoder.py:281-297), so
    BatchNorm normalizes each by its own statistics; the loss is CE + CE + 1.0 x MSE of the
    logits (encoder_decoder.py:222-224, 302)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8)).train()

    def model(f: dict[str, torch.Tensor]) -> torch.Tensor:
        return net(f["x"])

    x = torch.randn(2, 2, 8, 4, 4)  # (B, [plain, guided], C, h, w)
    x[:, 1] = 3 * x[:, 1] + 1  # the guided view's statistics differ
    label = torch.randint(0, 8, (2, 8, 8))
    cfg = ViewLoss(
        consistency_weight=0.0, consistency="kl", guided_weight=1.0, guided_consistency_weight=1.0
    )
    before = copy.deepcopy(net.state_dict())
    total, _ = views_loss(model, {"x": x}, label, cfg)
    ours_stats = copy.deepcopy(net.state_dict())
    net.load_state_dict(before)
    plain, guided = net(x[:, 0]), net(x[:, 1])
    want = (
        ref.mmseg_decode_loss(plain, label[:, None])
        + ref.mmseg_decode_loss(guided, label[:, None])
        + torch.nn.functional.mse_loss(guided, plain)
    )
    torch.testing.assert_close(total, want)
    for k, v in net.state_dict().items():  # running statistics updated once per view
        torch.testing.assert_close(ours_stats[k], v)
    net.load_state_dict(before)
    joint = net(torch.cat([x[:, 0], x[:, 1]]))  # one batch: statistics shared
    assert not torch.allclose(joint[:2], plain.detach(), atol=1e-3)


def test_diffs_channel_order_is_the_one_the_preset_declares_not_a_guess_from_names() -> None:
    """Within a stride, the taps concatenate in the order the store lists them (the preset's:
    `diff_paths` declares each block's ResNets, then its attentions), whatever they are named."""
    declared = [("zz_first", 32), ("aa_second", 32), ("m8", 8), ("m16", 16)]
    specs = {f"t{t}/{name}": [8, s] for t in (91, 3) for name, s in declared}
    fusion = DiffFinecoder(fusion_config(kind="diff", inputs=specs, widths=[16, 32, 64, 128]))
    assert fusion.keys_by_stride[32] == [
        "t91/zz_first",
        "t3/zz_first",
        "t91/aa_second",
        "t3/aa_second",
    ]
