"""Model loading: the random presets are seeded, cached atomically and loaded like a real model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from ham_engine import tiny
from ham_engine.inversion import DdimSchedule
from ham_engine.loading import DiffusionModel, load_model, resolve_device, resolve_dtype

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture
def cache_env(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAM_TINY_DIR", str(tiny_dir))
    monkeypatch.delenv("HAM_DEVICE", raising=False)
    monkeypatch.delenv("HAM_DTYPE", raising=False)
    return tiny_dir


@pytest.fixture
def model(cache_env: Path) -> DiffusionModel:
    return load_model("tiny")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_tiny_is_saved_in_sd_layout_under_a_versioned_folder(model: DiffusionModel, cache_env: Path) -> None:
    folder = cache_env / f"tiny.fmt{tiny.FORMAT_VERSION}"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (folder / "tokenizer" / "vocab.json").is_file()
    assert (folder / "tokenizer" / "merges.txt").is_file()
    # No staging folder is left behind.
    assert [p.name for p in cache_env.iterdir() if p.name.startswith(".")] == []


def test_tiny_unet_is_sd_shaped_with_decoder_self_and_cross_attention(model: DiffusionModel) -> None:
    assert isinstance(model.unet, UNet2DConditionModel)
    names = list(model.unet.attn_processors)
    assert any(n.startswith("up_blocks.") and ".attn1." in n for n in names)
    assert any(n.startswith("up_blocks.") and ".attn2." in n for n in names)
    assert any(n.startswith("mid_block.") for n in names)
    assert any(n.startswith("down_blocks.") for n in names)
    assert model.vae_scale_factor == 8
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size


def test_tiny_weights_are_identical_across_independent_builds(model: DiffusionModel, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path))
    rebuilt = load_model("tiny")
    for part in ("unet", "vae", "text_encoder"):
        a, b = _state(getattr(model, part)), _state(getattr(rebuilt, part))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_building_tiny_leaves_the_global_rng_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_components_are_frozen_in_eval_mode_with_stock_sdpa_attention(model: DiffusionModel) -> None:
    for part in (model.unet, model.vae, model.text_encoder):
        assert not part.training
        assert not any(p.requires_grad for p in part.parameters())
    assert all(type(p) is AttnProcessor2_0 for p in model.unet.attn_processors.values())
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32


def test_scheduler_is_ddim_with_the_sd_training_schedule(model: DiffusionModel) -> None:
    config = model.scheduler.config
    assert isinstance(model.scheduler, DDIMScheduler)
    assert (config.num_train_timesteps, config.beta_schedule) == (1000, "scaled_linear")
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert config.steps_offset == 1
    assert config.set_alpha_to_one is False
    assert config.clip_sample is False
    assert model.prediction_type == "epsilon"


def test_tiny_v_predicts_v_and_shares_nothing_on_disk_with_tiny(cache_env: Path) -> None:
    v_model = load_model("tiny-v")
    assert v_model.prediction_type == "v_prediction"
    assert v_model.name == "tiny-v"
    assert (cache_env / f"tiny-v.fmt{tiny.FORMAT_VERSION}" / "model_index.json").is_file()


def test_tokenizer_pads_to_77_and_applies_merges(model: DiffusionModel) -> None:
    ids = model.tokenizer(["the oil painting"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77
    tokens = model.tokenizer.convert_ids_to_tokens(ids[:4])
    assert tokens == ["<|startoftext|>", "the</w>", "oil</w>", "p"]


def test_encode_prompt_gives_77_token_embeddings_that_depend_on_the_text(model: DiffusionModel) -> None:
    embeddings = model.encode_prompt(["an oil painting", "an ink engraving", "an oil painting"]).hidden_states
    assert embeddings.shape == (3, 77, model.text_encoder.config.hidden_size)
    assert embeddings.dtype == model.dtype
    assert torch.equal(embeddings[0], embeddings[2])
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_encode_and_decode_map_pixels_to_latents_8x_smaller_and_back(model: DiffusionModel) -> None:
    pixels = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode_image(pixels)
    assert latents.shape == (2, 4, 8, 16)
    assert torch.equal(latents, model.encode_image(pixels))  # the posterior mean: no sampling noise
    decoded = model.decode_latents(latents)
    assert decoded.shape == (2, 3, 64, 128)
    assert decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_a_copied_model_folder_loads_by_path_with_the_same_weights(model: DiffusionModel, cache_env, tmp_path) -> None:
    folder = tmp_path / "my-model"
    shutil.copytree(cache_env / f"tiny.fmt{tiny.FORMAT_VERSION}", folder)
    by_path = load_model(str(folder))
    assert by_path.name == str(folder)
    a, b = _state(model.unet), _state(by_path.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_outdated_scheduler_config_is_fixed_as_the_stock_sd_pipeline_fixes_it(
    model: DiffusionModel, cache_env, tmp_path
) -> None:
    folder = tmp_path / "old-model"
    shutil.copytree(cache_env / f"tiny.fmt{tiny.FORMAT_VERSION}", folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    # An early SD 1.x config: a PNDM scheduler, steps_offset 0, no clip_sample (DDIM's default is True).
    config.update({"_class_name": "PNDMScheduler", "steps_offset": 0, "skip_prk_steps": True})
    del config["clip_sample"]
    config_file.write_text(json.dumps(config))
    old = load_model(str(folder))
    assert (old.scheduler.config.steps_offset, old.scheduler.config.clip_sample) == (1, False)
    old_schedule = DdimSchedule.from_scheduler(old.scheduler, 10, "cpu")
    assert old_schedule.timestep_values == DdimSchedule.from_scheduler(model.scheduler, 10, "cpu").timestep_values
    assert old_schedule.timestep_values[-1] == 1


def test_concurrent_builds_end_with_one_complete_copy(tmp_path: Path) -> None:
    code = "from ham_engine.loading import load_model; m = load_model('tiny'); print(m.prediction_type)"
    env = {**os.environ, "HAM_TINY_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=PIPE, stderr=PIPE) for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in results]
    assert [out.decode().strip() for out, _ in results] == ["epsilon", "epsilon"]
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny.fmt{tiny.FORMAT_VERSION}"]


def test_a_hub_id_loads_offline_from_the_local_hugging_face_cache(model: DiffusionModel, cache_env, tmp_path) -> None:
    # The layout huggingface_hub keeps: refs/main names the snapshot holding the files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--ham-test--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(cache_env / f"tiny.fmt{tiny.FORMAT_VERSION}", repo / "snapshots" / commit)
    code = (
        "from ham_engine.loading import load_model; m = load_model('ham-test/tiny-sd');"
        "print(m.name, m.prediction_type, sum(p.numel() for p in m.unet.parameters()))"
    )
    # huggingface_hub reads its cache location at import time: a fresh process.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    parameters = sum(p.numel() for p in model.unet.parameters())
    assert done.stdout.split() == ["ham-test/tiny-sd", "epsilon", str(parameters)]
    assert "Could not reach the Hub" not in done.stderr  # offline goes straight to the cache


def test_a_missing_folder_is_a_value_error_naming_it(cache_env: Path) -> None:
    with pytest.raises(ValueError, match=r"folder './no-such-model' does not exist"):
        load_model("./no-such-model")


def test_a_folder_that_is_not_a_pipeline_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        load_model(str(tmp_path))


def test_an_uncached_hub_id_offline_says_how_to_download_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = r"not found locally and the Hub is offline.*huggingface-cli download nobody/x"
    with pytest.raises(ValueError, match=expected):
        load_model("nobody/x")


def test_an_empty_model_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="model: "):
        load_model("  ")


def test_device_comes_from_ham_device_then_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAM_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("HAM_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected


def test_bad_device_and_dtype_are_value_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAM_DTYPE", raising=False)
    with pytest.raises(ValueError, match="device: 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="dtype: 'fp8'"):
        resolve_dtype(torch.device("cpu"), "fp8")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        resolve_dtype(torch.device("cpu"), "fp16")


def test_dtype_defaults_to_fp16_on_cuda_fp32_on_cpu_and_honours_ham_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAM_DTYPE", raising=False)
    assert resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setenv("HAM_DTYPE", "bf16")
    assert resolve_dtype(torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(torch.device("cpu"), torch.float32) == torch.float32


def test_a_transformer_folder_is_said_to_need_its_transformer_not_a_unet(tmp_path) -> None:
    from ham_engine.loading import _not_found

    error = _not_found(str(tmp_path), OSError("no config"), ("text_encoder", "tokenizer"), denoiser="transformer")
    assert "needs transformer/, vae/, text_encoder/, tokenizer/, scheduler/" in str(error)
