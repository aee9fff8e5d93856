"""Tests for the safe LDM checkpoint reader and the LDM -> diffusers AutoencoderKL importer."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from ldm_fixture import (
    FAKE_TOP_LEVEL,
    AttributeDict,
    OpenPayload,
    ShellPayload,
    build_ldm_autoencoder,
    fake_ldm_modules,
    ldm_reconstruct,
    save_pickled_module,
)

from anomaly.models.ldm_import import (
    LDMImportError,
    diffusers_to_ldm_name,
    import_ldm_checkpoint,
    ldm_to_diffusers_name,
    ldm_to_diffusers_state_dict,
)
from anomaly.models.safe_unpickle import CheckpointFormatError, Inert, extract_state_dict, safe_load

LAYOUTS = {
    "two-level": {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1},
    "medical-vae-shape": {"ch": 32, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2},
}


def _fake_modules_gone() -> bool:
    return not any(name.split(".")[0] in FAKE_TOP_LEVEL for name in sys.modules)


@torch.no_grad()
def _diffusers_reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Encoder mean -> decoder, in float64 so that only the weights can make results differ."""
    vae = vae.to(torch.float64)
    return vae.decode(vae.encode(x.double()).latent_dist.mode()).sample


def _ldm_reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The original module's reconstruction in float64; the module is returned to float32 for saving."""
    reference = ldm_reconstruct(model.double(), x.double())
    model.float()
    return reference


def _markers(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "shell_marker", tmp_path / "open_marker"


def _payloads(tmp_path: Path) -> dict[str, object]:
    shell, opened = _markers(tmp_path)
    return {"payload_shell": ShellPayload(shell), "payload_open": OpenPayload(opened)}


def test_payloads_run_under_a_plain_unpickler(tmp_path: Path) -> None:
    """The payloads used below are live: plain pickle would run them (so their absence means something)."""
    shell, opened = _markers(tmp_path)
    payloads = _payloads(tmp_path)
    assert pickle.loads(pickle.dumps(payloads["payload_shell"])) == 0
    pickle.loads(pickle.dumps(payloads["payload_open"])).close()
    assert shell.exists() and opened.exists()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pickled_ldm_module_converts_to_equal_diffusers_model(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_ldm_autoencoder(**LAYOUTS[layout])
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = _ldm_reference(model, x)
    ckpt = save_pickled_module(model, tmp_path / "VAE-Medical-klf8.pt", **_payloads(tmp_path))
    assert _fake_modules_gone()

    out = tmp_path / "medical-vae"
    report = import_ldm_checkpoint(ckpt, out)

    assert not any(m.exists() for m in _markers(tmp_path)), "pickled code ran during import"
    assert _fake_modules_gone(), "the importer imported a module named in the pickle"
    full = model.state_dict()
    n_loss = sum(k.startswith("loss.") for k in full)
    assert n_loss > 0
    assert report.n_tensors == len(full)
    assert report.n_used == len(full) - n_loss
    assert report.dropped == {"loss.": n_loss}
    assert report.dropped_prefixes == ("loss.",)
    assert json.loads(json.dumps(report.to_dict()))["sha256"] == report.sha256
    assert report.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    spec = LAYOUTS[layout]
    assert report.config["block_out_channels"] == [spec["ch"] * m for m in spec["ch_mult"]]
    assert report.config["layers_per_block"] == spec["num_res_blocks"]
    assert report.config["latent_channels"] == 4
    assert report.config["in_channels"] == report.config["out_channels"] == 1
    assert report.config["scaling_factor"] == pytest.approx(0.18215)
    assert report.config["sample_size"] == 256
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderKL"

    vae = AutoencoderKL.from_pretrained(out, low_cpu_mem_usage=False).eval()
    assert sum(p.numel() for p in vae.parameters()) == sum(
        v.numel() for k, v in full.items() if not k.startswith("loss.")
    )
    converted = _diffusers_reconstruct(vae, x)
    assert converted.shape == reference.shape == x.shape
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(converted, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_safe_load_gives_inert_records_and_exact_tensors(tmp_path: Path, zip_format: bool) -> None:
    model = build_ldm_autoencoder(ch=32, ch_mult=(1,), num_res_blocks=1)
    ckpt = save_pickled_module(model, tmp_path / "vae.pt", zip_format=zip_format, **_payloads(tmp_path))
    before = set(sys.modules)

    loaded = safe_load(ckpt)

    assert set(sys.modules) == before
    assert not any(m.exists() for m in _markers(tmp_path))
    assert isinstance(loaded, Inert)
    assert type(loaded).qualified_name() == "ldm.models.autoencoder.AutoencoderKL"
    attrs = loaded.state
    shell = attrs["payload_shell"]
    assert isinstance(shell, Inert)
    assert type(shell).qualified_name() == f"{os.system.__module__}.system"
    assert shell.args == (f"touch '{_markers(tmp_path)[0]}'",)
    assert type(attrs["payload_open"]).qualified_name() == f"{open.__module__}.open"
    assert attrs["_hparams"].dict_items["embed_dim"] == 4
    assert attrs["_dtype"] is torch.float32

    state = extract_state_dict(loaded)
    expected = model.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name
    assert state["loss.discriminator.main.3.num_batches_tracked"].dtype == torch.int64
    assert state["loss.logvar"].shape == ()


def test_dict_checkpoint_with_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_ldm_autoencoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, seed=3)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    reference = _ldm_reference(model, x)
    state_dict = {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}
    state_dict["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    state_dict["cond_stage_model.embedding.weight"] = torch.zeros(2, 8)
    checkpoint = {
        "epoch": 3,
        "global_step": 1200,
        "state_dict": state_dict,
        "hyper_parameters": AttributeDict(base_learning_rate=4.5e-6),
        "callbacks": {"payload": OpenPayload(_markers(tmp_path)[1])},
    }
    path = tmp_path / "last.ckpt"
    with fake_ldm_modules():
        torch.save(checkpoint, path)

    flat = extract_state_dict(safe_load(path))
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in flat
    assert set(flat) == set(state_dict)
    assert torch.equal(flat["first_stage_model.quant_conv.weight"], model.quant_conv.weight)

    report = import_ldm_checkpoint(path, tmp_path / "out")
    n_loss = sum(k.startswith("loss.") for k in model.state_dict())
    assert report.dropped == {"cond_stage_model.": 1, "first_stage_model.loss.": n_loss, "model.": 1}
    assert not _markers(tmp_path)[1].exists()
    vae = AutoencoderKL.from_pretrained(tmp_path / "out", low_cpu_mem_usage=False).eval()
    torch.testing.assert_close(_diffusers_reconstruct(vae, x), reference, atol=1e-5, rtol=0)


def test_missing_weight_is_rejected_by_name(tmp_path: Path) -> None:
    model = build_ldm_autoencoder(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    del model.decoder.up[0].block[1].conv2._parameters["weight"]
    ckpt = save_pickled_module(model, tmp_path / "vae.pt")
    out = tmp_path / "out"
    with pytest.raises(LDMImportError) as err:
        import_ldm_checkpoint(ckpt, out)
    message = str(err.value)
    assert "missing (1)" in message
    assert "decoder.up.0.block.1.conv2.weight" in message
    assert "decoder.up_blocks.1.resnets.1.conv2.weight" in message
    assert str(ckpt) in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [ckpt]


def test_unexpected_and_misshapen_weights_are_rejected(tmp_path: Path) -> None:
    model = build_ldm_autoencoder(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    state = dict(model.state_dict())
    state["encoder.extra_head.weight"] = torch.zeros(3)
    state["decoder.conv_out.bias"] = torch.zeros(2)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(LDMImportError) as err:
        import_ldm_checkpoint(path, tmp_path / "out")
    message = str(err.value)
    assert "unexpected (1): encoder.extra_head.weight" in message
    assert "decoder.conv_out.bias: checkpoint (2,), model (1,)" in message


def test_existing_output_folder_needs_overwrite(tmp_path: Path) -> None:
    model = build_ldm_autoencoder(ch=32, ch_mult=(1,), num_res_blocks=1)
    path = tmp_path / "vae.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    out = tmp_path / "out"
    import_ldm_checkpoint(path, out)
    with pytest.raises(LDMImportError, match="not empty"):
        import_ldm_checkpoint(path, out)
    report = import_ldm_checkpoint(path, out, overwrite=True)
    assert report.n_used == len(model.state_dict()) - sum(k.startswith("loss.") for k in model.state_dict())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for item in out.iterdir():
        assert stat.S_IMODE(item.stat().st_mode) == 0o666 & ~umask, item
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_non_torch_files_get_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointFormatError, match="notes.pt: not a PyTorch checkpoint"):
        safe_load(text)
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        import_ldm_checkpoint(text, tmp_path / "out")

    plain_zip = tmp_path / "archive.pt"
    with zipfile.ZipFile(plain_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="not a torch.save checkpoint"):
        safe_load(plain_zip)

    plain_pickle = tmp_path / "number.pkl"
    plain_pickle.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(CheckpointFormatError, match="no torch.save header"):
        safe_load(plain_pickle)

    with pytest.raises(CheckpointFormatError, match="no such file"):
        safe_load(tmp_path / "absent.pt")


def test_damaged_archive_is_reported(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, good)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(damaged, "w") as dst:
        data_records = [n for n in src.namelist() if "/data/" in n]
        for name in src.namelist():
            if name != data_records[0]:
                dst.writestr(name, src.read(name))
    assert torch.equal(extract_state_dict(safe_load(good))["w"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(CheckpointFormatError, match="missing from the archive"):
        safe_load(damaged)


def test_name_mapping_round_trips_over_a_diffusers_model() -> None:
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    for name in vae.state_dict():
        ldm = diffusers_to_ldm_name(name, 4)
        assert ldm is not None, name
        assert ldm_to_diffusers_name(ldm, 4) == name
    assert ldm_to_diffusers_name("decoder.up.3.upsample.conv.weight", 4) == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert ldm_to_diffusers_name("decoder.up.0.block.2.nin_shortcut.bias", 4) == (
        "decoder.up_blocks.3.resnets.2.conv_shortcut.bias"
    )
    assert ldm_to_diffusers_name("encoder.mid.attn_1.proj_out.weight", 4) == (
        "encoder.mid_block.attentions.0.to_out.0.weight"
    )
    assert ldm_to_diffusers_name("decoder.up.4.block.0.conv1.weight", 4) is None


def test_state_dict_conversion_reshapes_attention_and_rejects_unknown_names() -> None:
    model = build_ldm_autoencoder(ch=32, ch_mult=(1,), num_res_blocks=1)
    converted = ldm_to_diffusers_state_dict(model.state_dict())
    assert not any(k.startswith("loss.") for k in converted)
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    torch.testing.assert_close(
        converted["decoder.mid_block.attentions.0.to_out.0.weight"], model.decoder.mid.attn_1.proj_out.weight[:, :, 0, 0]
    )
    with pytest.raises(LDMImportError, match="encoder.down.0.attn.0.q.weight"):
        ldm_to_diffusers_state_dict({**model.state_dict(), "encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)})


def test_import_command_says_when_a_checkpoint_is_not_the_medical_vae_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANOMALY_MODELS_DIR", str(tmp_path / "models"))
    layout = next(iter(LAYOUTS))
    ckpt = save_pickled_module(build_ldm_autoencoder(**LAYOUTS[layout]), tmp_path / "small-klf8.pt",
                               **_payloads(tmp_path))
    assert main(["models", "import", str(ckpt)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "models" / "medical-vae"
    assert "not the public Medical-VAE architecture" in out and f"--model {folder}" in out
    assert not any(m.exists() for m in _markers(tmp_path))
