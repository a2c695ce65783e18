"""Training guards, in-process: non-finite steps, repeatable losses, checkpoints that cannot
run code. (Real kills and Ctrl-C are in test_crash_safety.py.)"""

import json
import pickle

import pytest
import torch
from conftest import assert_user_error
from safetensors.torch import load_file
from test_train import args

from train.__main__ import main
from train.autoencoder.losses import GeneratorLoss


def losses(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def nan_on_calls(monkeypatch):
    """Make the generator loss NaN on the given (0-based) calls, as an fp16 overflow would."""
    calls = {"n": 0, "nan": set()}
    original = GeneratorLoss.__call__

    def patched(self, *a, **kw):
        loss, logs = original(self, *a, **kw)
        if calls["n"] in calls["nan"]:
            loss = loss * float("nan")
            logs["loss"] = float("nan")
        calls["n"] += 1
        return loss, logs

    monkeypatch.setattr(GeneratorLoss, "__call__", patched)
    return calls["nan"]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, image_folder, nan_on_calls, capsys):
    nan_on_calls.update({1, 2})
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=5", "loss.perceptual_weight=0", "loss.disc_weight=0")) == 0
    log = losses(out)
    assert [r["nonfinite_steps"] for r in log] == [0, 1, 2, 2, 2]
    printed = capsys.readouterr()
    assert "non-finite loss, step skipped (2 in a row, 2 in this run)" in printed.out + printed.err
    weights = load_file(out / "codec" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN never reached a weight
    state = json.loads((out / "checkpoints" / "step_00000005" / "train_state.json").read_text())
    assert state["nonfinite"] == {"total": 2, "in_a_row": 0}


def test_run_stops_after_too_many_nonfinite_steps_in_a_row(tmp_path, image_folder, nan_on_calls, capsys):
    nan_on_calls.update(range(3, 100))
    out = tmp_path / "run"
    code = main(args(out, image_folder, "max_steps=20", "loss.perceptual_weight=0",
                     "loss.disc_weight=0", "max_nonfinite_steps=3"))
    err = capsys.readouterr().err
    assert code == 1
    assert "3 optimiser steps in a row had a non-finite loss" in err
    assert "step_00000003" in err  # names the checkpoint to go back to
    assert not (out / "codec").exists()


def test_same_seed_same_losses_other_seed_other_losses(tmp_path, image_folder):
    runs = {}
    for name, seed, extra in (("a", 3, "data.num_workers=2"), ("b", 3, "data.num_workers=0"),
                              ("c", 4, "data.num_workers=2"), ("d", 3, "deterministic=true")):
        out = tmp_path / name
        assert main(args(out, image_folder, "max_steps=4", f"seed={seed}", extra)) == 0
        runs[name] = [(r["step"], r["loss"], r["rec"], r["kl"]) for r in losses(out)]
    assert len(runs["a"]) == 4
    assert runs["a"] == runs["b"]  # bit-identical floats, LPIPS and the GAN included, any workers
    assert runs["a"] == runs["d"]  # CPU kernels are deterministic already
    assert runs["a"][0] != runs["c"][0]
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch was put back


class _Exploit:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_resume_never_unpickles_code(tmp_path, image_folder, victim, capsys):
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=3", "loss.perceptual_weight=0", "loss.disc_weight=0")) == 0
    marker = tmp_path / "exploited"
    target = out / "checkpoints" / "step_00000003" / victim
    assert target.exists()
    target.write_bytes(pickle.dumps(_Exploit(marker)))
    assert_user_error(capsys, main(args(out, image_folder, "max_steps=6", "resume=true", "loss.perceptual_weight=0",
                  "loss.disc_weight=0")), f"cannot resume from .*step_00000003.*{victim}")
    assert not marker.exists()


@pytest.mark.parametrize("victim, error", [
    ("train_state.safetensors", "step_00000003: its training state is unreadable"),
    ("train_state.json", "step_00000003: its training state is unreadable"),
    ("vae_config.json", "step_00000003: vae_config.json is unreadable"),
])
def test_corrupt_checkpoint_files_are_clear_errors(tmp_path, image_folder, victim, error, capsys):
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=3", "loss.perceptual_weight=0", "loss.disc_weight=0")) == 0
    (out / "checkpoints" / "step_00000003" / victim).write_bytes(b"\x00{" * 10)
    assert_user_error(capsys, main(args(out, image_folder, "max_steps=6", "resume=true", "loss.perceptual_weight=0",
                                        "loss.disc_weight=0")), error)
