import pytest
import torch
from helpers import fusion_config as FusionConfig
from helpers import head_config as HeadConfig

from pipeline.core.errors import ModelError
from pipeline.core.fileio import MARKER
from pipeline.data.pixel_reader import PIXEL_KEY
from pipeline.heads.fusion import HyperfeatureAggregation, StrideAggregation
from pipeline.heads.pixel_cnn import pixel_fusion_config
from pipeline.heads.seg_model import SegModel

# DIFF-like layout: strides 64/32/16/8, several layers per stride, two timesteps.
SPECS = {
    f"t{t}/up_blocks.{b}.{kind}.{j}": [c, s]
    for t in (50, 150)
    for b, (c, s) in enumerate([(40, 64), (40, 32), (24, 16), (16, 8)])
    for kind in ("resnets", "attentions")
    for j in range(2)
}


def feats(specs, batch=2, size=(128, 256)):
    g = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(batch, c, size[0] // s, size[1] // s, generator=g)
        for k, (c, s) in specs.items()
    }


def test_stride_aggregation_gives_diff_strides_and_widths():
    cfg = FusionConfig(kind="stride", inputs=SPECS, widths=[8, 16, 32, 64])
    fusion = StrideAggregation(cfg)
    outs = fusion(feats(SPECS))
    assert fusion.out_specs == [(8, 4), (16, 8), (32, 16), (64, 32)]
    assert [tuple(o.shape) for o in outs] == [
        (2, 8, 32, 64),
        (2, 16, 16, 32),
        (2, 32, 8, 16),
        (2, 64, 4, 8),
    ]
    # one bottleneck per input stride, input = all layers x timesteps of that stride
    assert sorted(fusion.bottleneck) == ["16", "32", "64", "8"]
    assert fusion.bottleneck["64"].conv1.in_channels == 40 * 4 * 2


def test_stride_aggregation_without_coarse_inputs_drops_missing_strides():
    specs = {k: v for k, v in SPECS.items() if v[1] <= 16}
    fusion = StrideAggregation(FusionConfig(inputs=specs, widths=[8, 16, 32, 64]))
    outs = fusion(feats(specs))
    assert fusion.out_specs == [(8, 4), (16, 8), (32, 16)]
    assert outs[-1].shape[-2:] == (8, 16)


def test_hyperfeatures_share_bottleneck_over_timesteps_and_mix_with_softmax():
    fusion = HyperfeatureAggregation(FusionConfig(kind="hyperfeatures", inputs=SPECS, channels=24))
    (out,) = fusion(feats(SPECS))
    assert out.shape == (2, 24, 16, 32)  # finest input stride 8
    assert len(fusion.bottlenecks) == len(SPECS) // 2  # one per layer, shared by 2 timesteps
    assert fusion.mixing.shape == (len(SPECS),)
    # mixing weights reach the output: zeroing all but one key changes it
    with torch.no_grad():
        fusion.mixing.copy_(torch.tensor([100.0] + [-100.0] * (len(SPECS) - 1)))
    (only,) = fusion(feats(SPECS))
    assert not torch.allclose(only, out)


@pytest.mark.parametrize("kind", ["stride", "hyperfeatures"])
@pytest.mark.parametrize("head", ["daformer", "mlp"])
def test_segmodel_shapes_and_gradients(kind, head):
    model = SegModel(FusionConfig(kind=kind, inputs=SPECS), HeadConfig(kind=head, embed_dim=32))
    logits = model(feats(SPECS))
    stride = 4 if kind == "stride" else 8
    assert logits.shape == (2, 19, 128 // stride, 256 // stride)
    logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pixel_baseline_model_shapes():
    model = SegModel(pixel_fusion_config([8, 16, 32, 64], [4, 8, 16, 32]), HeadConfig(embed_dim=16))
    logits = model({PIXEL_KEY: torch.randn(2, 3, 64, 128)})
    assert logits.shape == (2, 19, 16, 32)


@pytest.mark.parametrize("kind", ["stride", "hyperfeatures"])
def test_save_load_round_trip_is_identical(tmp_path, kind):
    model = SegModel(
        FusionConfig(kind=kind, inputs=SPECS, widths=[8, 16, 32, 64]),
        HeadConfig(kind="daformer", norm="bn"),
    )
    with torch.no_grad():  # make BN buffers non-default so they must round-trip too
        model(feats(SPECS))
    model.eval()
    model.save_pretrained(tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        MARKER,  # the folder is the pipeline's (fileio.atomic_path)
        "config.json",
        "config.json.sha256",
        "model.safetensors",
        "model.safetensors.sha256",
    ]
    loaded = SegModel.from_pretrained(tmp_path / "head").eval()
    x = feats(SPECS)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.head_config == model.head_config


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        SegModel.from_pretrained(tmp_path)
    model = SegModel(FusionConfig(inputs=SPECS), HeadConfig())
    model.save_pretrained(tmp_path / "m")
    other = SegModel(FusionConfig(inputs=SPECS, widths=[8, 16, 32, 64]), HeadConfig())
    other.save_pretrained(tmp_path / "o")
    for name in ("model.safetensors", "model.safetensors.sha256"):
        (tmp_path / "o" / name).replace(tmp_path / "m" / name)  # weights of another config
    with pytest.raises(ModelError, match="model.safetensors: weights do not match the config"):
        SegModel.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "t")
    weights = tmp_path / "t" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a cut-off copy
    with pytest.raises(ModelError, match=r"t/model.safetensors: content differs from its recorded"):
        SegModel.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors.sha256").unlink()
    with pytest.raises(ModelError, match=r"t/model.safetensors: no recorded digest"):
        SegModel.from_pretrained(tmp_path / "t")


def test_missing_feature_key_is_a_clear_error():
    model = SegModel(FusionConfig(inputs=SPECS), HeadConfig())
    x = feats(SPECS)
    x.pop(next(iter(SPECS)))
    with pytest.raises(ModelError, match="lack keys"):
        model(x)
