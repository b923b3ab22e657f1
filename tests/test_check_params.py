"""check_params refuses what a later stage would refuse, before DVC removes any output: every
rule (a function in pipeline/ that raises ConfigError) is found in the code and either run here
through check_params or named as something only the running stage can know."""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import params

from pipeline.core.errors import ConfigError
from pipeline.plan.checks import check_all

ROOT = Path(__file__).resolve().parents[1]

# Rules whose input is not in params.yaml: what the stage finds when it runs.
RUNTIME = {
    "pipeline/data/sampling.py:RcsTable.__init__": "the training labels' class pixel counts",
    "pipeline/core/device.py:claim_gpu": "which GPUs other stages hold at that moment",
    "pipeline/core/device.py:gpu_wait_s": "the cuda:free form, checked inside check_device",
    "pipeline/loops/train.py:check_batch_split": (
        "the world size torchrun starts (train.processes itself is checked by TrainConfig)"
    ),
    "pipeline/plan/budget.py:_count": (
        "`python -m pipeline.plan` on a dataset not here (check_params names its root first)"
    ),
    "pipeline/core/device.py:array_task": "the Slurm array task's environment, not a param",
    "pipeline/plan/__main__.py:image_counts": "`python -m pipeline.plan --images`, not a param",
    "pipeline/plan/budget.py:dvc_cache_type": "the project's DVC config files, not params",
}

# A state-dict file of another architecture: its header names tensors the UNet lacks.
WRONG_UNET = Path(tempfile.mkdtemp()) / "wrong_unet.safetensors"
safetensors.torch.save_file({"conv_in.weight": torch.zeros(1, 1, 1, 1)}, WRONG_UNET)

# Rule -> (params overrides that break it, the stage's message, which check_params must give).
CASES = {
    "pipeline/diffusion/model.py:check_unet_file": (
        {"model": {"unet": str(WRONG_UNET)}},
        f"model.unet {WRONG_UNET}: not a UNet of this model's architecture",
    ),
    "pipeline/diffusion/text.py:check_prompt_lengths": (
        {"prompts": {"scene": "a city street " * 40}},
        "prompts.variants scene: 122 tokens, the text encoder reads 77",
    ),
    "pipeline/data/datasets.py:check_destinations": (
        {"data": {"targets": {"fog": {"root": "/tmp"}}}},
        "data.targets.fog.root /tmp: a synthetic dataset is generated inside prepare's output "
        "folder data/datasets",
    ),
    "pipeline/loops/encode.py:check_sizes": (
        {"encode": {"crop": [500, 500]}},
        "encode.crop [500, 500]: must be a multiple of 64 (the UNet's grid",
    ),
    "pipeline/loops/encode.py:check_crop": (
        {"encode": {"crop": [64, 64]}, "sampling": {"feature_crop": [64, 64]}},
        "encode.crop [64, 64] and sampling.feature_crop [64, 64]: crop draws are read whole",
    ),
    "pipeline/loops/extract.py:check_timestep": (
        {"timesteps": [50, 1000]},
        "timesteps: 1000 is outside 0..999, the range of this model's scheduler",
    ),
    "pipeline/cache/storage.py:Pca.check_widths": (
        {"extract": {"storage": "pca-64"}},
        "extract.storage pca-64: keeps at least as many channels as taps up0_res0 (64)",
    ),
    "pipeline/extraction/noise.py:noise_mode": (
        {"extract": {"noise_mode": "fresh"}},
        "extract.noise_mode: unknown noise mode 'fresh': expected one of ['add', 'trajectory', "
        "'clean'] (got 'fresh')",
    ),
    "pipeline/loops/train.py:check_crop_stride": (
        {"sampling": {"feature_crop": [96, 96]}},
        "sampling.feature_crop [96, 96] must be a multiple of the largest stride 64",
    ),
    "pipeline/loops/train.py:check_pixel_input": (
        {"train": {"features": "pixels"}, "encode": {"crop": [64, 64]}},
        "train.features pixels reads whole frames; the source was encoded as crop draws",
    ),
    "pipeline/cache/trajectories.py:check_on_schedule": (
        {"extract": {"noise_mode": "trajectory"}, "timesteps": [50, 91]},
        "timesteps [50]: not on the inversion schedule (extract.noise_mode trajectory)",
    ),
    "pipeline/plan/budget.py:Budget.check_fits": (
        {"data": {"source": {"count": 10**8}}},
        "TB more disk (58.8 TB of outputs, ",  # whatever outputs this checkout holds
    ),
    "pipeline/loops/cleandift.py:check_unet_source": (
        {"model": {"unet": "data/cleandift/unet"}},
        "model.unet data/cleandift/unet: the cleandift stage writes it only with cleandift.steps > 0",
    ),
    "pipeline/core/device.py:check_device": (
        {"model": {"device": "cuda:7", "dtype": "fp32"}},
        "model.device cuda:7: this machine has",
    ),
}

# A rule check_params reaches through a kind's method (rule -> the file and method calling it).
VIA = {
    "pipeline/cache/trajectories.py:check_on_schedule": (
        "pipeline/extraction/noise.py",
        "Trajectory.check_timesteps",
    ),
}


def rules() -> set[str]:
    """Every function in pipeline/ that raises ConfigError itself ("path:Class.function");
    params.py's group validation is shared by construction (stages validate with it too), and
    checks.py is check_params itself (it gathers the rules' messages into one)."""
    found = set()
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path not in (ROOT / "pipeline/core/params.py", ROOT / "pipeline/plan/checks.py"):
            rel = path.relative_to(ROOT).as_posix()
            found |= {f"{rel}:{name}" for name in _raising(ast.parse(path.read_text()), [])}
    return found


def _raising(node: ast.AST, names: list[str]) -> set[str]:
    """Dotted names of the functions under `node` with a `raise ConfigError(...)` of their own."""
    out = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.ClassDef):
            out |= _raising(child, [*names, child.name])
            continue
        exc = child.exc if isinstance(child, ast.Raise) else None
        if isinstance(exc, ast.Call) and getattr(exc.func, "id", "") == "ConfigError":
            out.add(".".join(names))
        out |= _raising(child, names)
    return out


def test_every_rule_of_every_stage_is_checked_first_or_known_only_at_run_time() -> None:
    found = rules()
    assert found == set(CASES) | set(RUNTIME), sorted(found ^ (set(CASES) | set(RUNTIME)))
    assert len(CASES) == 14 and len(RUNTIME) == 8  # 22 rules
    # Called directly, or handed to check_params' `check(fn, ...)` by name.
    tree = ast.parse((ROOT / "pipeline/plan/checks.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    named = {_name(n.func) for n in calls} | {_name(n.args[0]) for n in calls if n.args}
    for rule in CASES:
        name = rule.rpartition(":")[2].rpartition(".")[2]
        if rule in VIA:  # reached through the method of a kind that calls it
            path, method = VIA[rule]
            fn = _function(ROOT / path, method)
            called = {_name(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
            assert name in called and method.rpartition(".")[2] in named, rule
        else:
            assert name in named, rule


def _function(path: Path, dotted: str) -> ast.AST:
    node: ast.AST = ast.parse(path.read_text())
    for part in dotted.split("."):
        node = next(
            n
            for n in ast.iter_child_nodes(node)
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == part
        )
    return node


def _name(node: ast.AST) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


@pytest.mark.parametrize("rule", sorted(CASES))
def test_check_params_gives_the_stage_s_message(rule: str) -> None:
    over, message = CASES[rule]
    if rule.endswith("check_device") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ConfigError) as e:
        check_all(params(**over))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "timesteps,message",
    [
        ([50.0, 150], "timesteps.0: Input should be a valid integer (got 50.0)"),
        ([True], "timesteps.0: Input should be a valid integer (got True)"),
        (["50; touch pwned"], "timesteps.0: Input should be a valid integer"),
        ([50, 50], "timesteps: [50] listed more than once"),
    ],
)
def test_timesteps_are_integers_as_written(timesteps: list, message: str) -> None:
    """50.0 is not coerced to 50: DVC would name its stage extract@50.0 and write t50.0."""
    with pytest.raises(ConfigError) as e:
        check_all(params(timesteps=timesteps))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "name", ["../../somewhere", "a/b", ".hidden", "has space", "dot.ted", "", "x" * 65]
)
def test_a_target_name_must_be_a_plain_name(name: str) -> None:
    targets = {name: params()["data"]["targets"]["fog"]}
    with pytest.raises(ConfigError, match="is not a plain name"):
        check_all(params(data={"targets": targets}))


def test_two_destinations_inside_one_another_are_refused() -> None:
    """A synthetic root inside another domain's folder: replacing one would delete the other."""
    over = {"data": {"targets": {"fog": {"root": "data/datasets/synthetic/real"}}}}
    with pytest.raises(ConfigError, match="domains 'fog' and 'real' would be written to"):
        check_all(params(**over))


def test_the_default_params_pass() -> None:
    check_all(params())
