"""Real subprocesses killed the hard way: SIGKILL during a checkpoint save and during a step,
then Ctrl-C (SIGINT to the whole process group, as a terminal sends it). Every resume must
continue from the last complete checkpoint and end with the weights of an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_train import args

from train.__main__ import main
from train.common.checkpoints import COMPLETE, latest_checkpoint

pytestmark = pytest.mark.slow

QUIET = ["loss.perceptual_weight=0", "loss.disc_weight=0", "checkpoint_every=4", "keep_checkpoints=10",
         "image_every=0"]


def start(out, data, *extra):
    # One loader worker: Ctrl-C reaches it too, and must not break the run.
    cmd = [sys.executable, "-m", "train",
           *args(out, data, "max_steps=100000", "data.num_workers=1", *QUIET, *extra)]
    # A session of its own, so a signal can go to the whole group like a terminal's Ctrl-C.
    # The threads this process computes with: results differ in the last bit with another count.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)


def wait_for(condition, proc, timeout=240.0, poll=0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess")


def logged_step(run):
    """The last step in train_log.jsonl (0 before the first; a line may be half written)."""
    try:
        steps = re.findall(r'^\{"step": (\d+),', (run / "train_log.jsonl").read_text(), re.M)
    except FileNotFoundError:
        return 0
    return int(steps[-1]) if steps else 0


def complete(ckpts, step):
    return lambda: (ckpts / f"step_{step:08d}" / COMPLETE).exists()


def test_sigkill_and_ctrl_c_resume_to_the_uninterrupted_result(tmp_path, image_folder):
    ckpts = tmp_path / "run" / "checkpoints"

    # 1. SIGKILL while the step-8 checkpoint is being written.
    proc = start(tmp_path / "run", image_folder)
    wait_for(complete(ckpts, 4), proc)
    wait_for(lambda: (ckpts / "step_00000008.tmp").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(ckpts).name == "step_00000004"
    assert not (ckpts / "step_00000008").exists()

    # 2. Resume; SIGKILL in the middle of training steps, between two checkpoints.
    proc = start(tmp_path / "run", image_folder, "resume=true")
    wait_for(complete(ckpts, 8), proc)
    # Step 9 logged and no save under way: the process is inside step 10 (or logging 9).
    wait_for(lambda: logged_step(tmp_path / "run") >= 9 and not list(ckpts.glob("*.tmp")), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(ckpts).name == "step_00000008"

    # 3. Resume; Ctrl-C saves a checkpoint where it stands and exits with 130.
    proc = start(tmp_path / "run", image_folder, "resume=true")
    wait_for(complete(ckpts, 12), proc)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted (SIGINT)" in output and "resume=true" in output
    last = latest_checkpoint(ckpts)
    assert last.name >= "step_00000012"
    assert not list(ckpts.glob("*.tmp"))
    steps = int(last.name.split("_")[1])

    # 4. Finish in-process at steps + 2 and compare with a run that was never interrupted.
    assert main(args(tmp_path / "run", image_folder, f"max_steps={steps + 2}", *QUIET, "resume=true")) == 0
    assert main(args(tmp_path / "straight", image_folder, f"max_steps={steps + 2}", *QUIET)) == 0
    a = load_file(tmp_path / "run" / "codec" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "straight" / "codec" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_a_checkpoint_that_fails_to_write_leaves_the_previous_one_and_says_so(
    tmp_path, image_folder, monkeypatch, capsys
):
    import train.autoencoder.export as export

    real_export, calls = export.export_codec, []

    def export_failing_the_second_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("measure_factors needs at least one image")
        return real_export(*a, **k)

    monkeypatch.setattr(export, "export_codec", export_failing_the_second_time)
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=6")) == 1  # one line, no traceback
    err = capsys.readouterr().err
    assert re.search(r"python -m train: error: the checkpoint of step 6 could not be written \(ValueError: "
                     r"measure_factors.*step_00000003 is intact: fix the cause and rerun with resume=true", err)
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]  # no half checkpoint
    monkeypatch.setattr(export, "export_codec", real_export)
    assert main(args(out, image_folder, "max_steps=6", "resume=true")) == 0
    assert complete(out / "checkpoints", 6)()
