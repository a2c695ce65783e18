"""Every code block of the README and of docs/*.md runs as written, offline, in a sandbox.

Blocks run in document order in one working folder, so a later block uses what an earlier one
made (``runs/t1`` trained by the README's first command, then exported, evaluated ...). What the
documents take from the user is provided here, small: the images under ``/data/images``
(``data/images`` in the sandbox), a model at ``/models/sd-vae-ft-mse``, ``photo.png``, an SD
pipeline folder, and, for Python blocks, the inputs they name (``images``, ``h``/``w``,
``digits``/``x``). Commands keep their words; only their size shrinks: training commands get
``--set`` options appended that make them a few steps of a test-sized model, ``eval`` looks at
two images. A block that cannot run here says so just above it with
``<!-- docs-test: skip (the reason) -->``, and every skip is listed by the test.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_DATA, smooth_image
from PIL import Image


def reading_order() -> list[Path]:
    """The README, then the guides in the order the README links them (a guide may use what an
    earlier one made, as a reader following the README would have), then any guide it does not link."""
    linked = [REPO / "docs" / name for name in
              dict.fromkeys(re.findall(r"\]\(docs/([\w.-]+\.md)\)", (REPO / "README.md").read_text()))]
    rest = [p for p in sorted((REPO / "docs").glob("*.md")) if p not in linked]
    return [REPO / "README.md", *linked, *rest]


DOCUMENTS = reading_order()
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->")

# Appended to training commands (later --set options win): a test-sized model, a few steps.
SHRINK = {
    "train": ["model.preset=test", "data.crop_size=32", "batch_size=2", "data.num_workers=0", "max_steps=2",
              "loss.perceptual_weight=0", "loss.disc_weight=0", "checkpoint_every=2", "image_every=0",
              "val_every=0", "scale_samples=2", "mixed_precision=no",
              "distill.student=test", "mlp.hidden_sizes=[16]", "mlp.latent_size=8"],
    "train.ldm": ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_levels=1",
                  "batch_size=2", "max_steps=2", "sample_steps=2", "num_samples=2", "checkpoint_every=2",
                  "sample_every=0"],
}
# The run docs/train.md starts with, which the other guides use.
TRAIN_T1 = "python -m train configs/tiny.yaml --set output_dir=runs/t1 --set data.train=../shared/data/bsds500/train"


def code_blocks(path: Path):
    """(language, code, line, skip reason or None) of each fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match[1]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.search(above)
        yield lang, "\n".join(lines[start + 1: end]), start + 1, skip[1] if skip else None
        i = end + 1


def commands(code: str) -> list[str]:
    """Shell lines of a bash block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


class Sandbox:
    def __init__(self, root: Path):
        self.root = root
        self.work = root / "work"
        self.work.mkdir()
        (root / "shared").symlink_to(SHARED_DATA.parent)  # "../shared/data/..." as in a checkout
        self.python: dict = {}

    def path(self, word: str) -> str:
        """Absolute paths of the documents, inside the sandbox."""
        word = re.sub(r"(^|=)/(data|models|tmp)/", lambda m: f"{m[1]}{self.work / m[2]}/", word)
        return word.replace("<an SD 1.x pipeline folder>", str(self.work / "sd-pipeline"))

    def run_bash(self, code: str) -> None:
        for words in commands(code):
            words = [self.path(w) for w in words]
            assert self.command(words) == 0, f"failed: {' '.join(words)}"

    def command(self, words: list[str]) -> int:
        from codec.cli import main as vae_codec

        if words[0] == "vae-codec":
            args = words[1:]
            if args[0] == "eval":
                args += ["--limit", "2", "--no-classical"]  # the JPEG/WebP references: tests/test_evaluate.py
            return vae_codec(args)
        if words[:2] == ["python", "-m"]:
            module, args = words[2], words[3:]
            if module == "train.ldm":
                from train.ldm import main
                return main(args + [x for s in SHRINK["train.ldm"] for x in ("--set", s)])
            from train.__main__ import main as train_main
            from train.distill import main as distill_main

            main = {"train": train_main, "train.distill": distill_main}[module]
            return main(args + [x for s in SHRINK["train"] for x in ("--set", s)])
        raise AssertionError(f"the docs test does not know how to run {words[0]!r}; add it or skip the block")

    def run_python(self, code: str) -> None:
        code = re.sub(r'"/(data|models|tmp)/', lambda m: f'"{self.work / m[1]}/', code)
        code = code.replace("<an SD 1.x pipeline folder>", str(self.work / "sd-pipeline"))
        exec(compile(code, "<docs block>", "exec"), self.python)

    def prepare(self, code: str) -> None:
        """Inputs a block reads that an earlier block's codec must have made."""
        from codec import Codec
        from codec.cli import main as vae_codec
        from codec.latents_file import save_latents

        t1 = self.work / "runs" / "t1" / "codec"
        if "runs/t1/" in code and not t1.exists():  # a guide read on its own: train.md's codec first
            self.run_bash(TRAIN_T1)
        if "StableDiffusionPipeline" in code and not (self.work / "sd-pipeline").exists():
            from diffusers import AutoencoderKL, StableDiffusionPipeline
            from test_pipelines import components

            vae = AutoencoderKL.from_pretrained(t1)
            StableDiffusionPipeline(**components(self.root, vae)).save_pretrained(self.work / "sd-pipeline")
        if "big.latents" in code and not (self.work / "big.latents.safetensors").exists():
            codec = Codec.from_pretrained(t1, device="cpu")
            big = torch.from_numpy(smooth_image(3, 256, 320)).permute(2, 0, 1)[None] / 127.5 - 1
            save_latents(self.work / "big.latents.safetensors", codec.encode(big), codec.latent_space, size=(256, 320))
        if "latents/pets" in code and not (self.work / "latents" / "pets").exists():
            assert vae_codec(["compress", "--codec", str(t1), "--input", str(self.work / "data" / "images"),
                              "--output", str(self.work / "latents" / "pets"), "--labels", "folders",
                              "--num-workers", "0", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    if not SHARED_DATA.exists():
        pytest.skip(f"real data {SHARED_DATA} is absent")
    box = Sandbox(tmp_path_factory.mktemp("docs"))
    w = box.work
    for i, name in enumerate(["cats/001.jpg", "cats/002.jpg", "dogs/001.jpg", "dogs/002.jpg"]):
        (w / "data" / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(i, 72, 96)).save(w / "data" / "images" / name)
    (w / "photos").mkdir()
    for i, name in enumerate(["photo.png", "a.png", "b.png", "photos/x.png", "photos/y.png"]):
        Image.fromarray(smooth_image(10 + i, 64, 80)).save(w / name)
    from codec import Codec
    from codec.models import build_autoencoder
    from codec.single_file import save_single_file

    torch.manual_seed(0)
    model = Codec(build_autoencoder("test"), device="cpu")
    model.save_pretrained(w / "models" / "sd-vae-ft-mse")
    save_single_file(model.vae, w / "sd_vae.safetensors")
    box.python.update(
        torch=torch,
        images=torch.stack([torch.from_numpy(smooth_image(i, 64, 64)).permute(2, 0, 1) for i in range(2)]) / 127.5 - 1,
        h=64, w=64,
        x=torch.rand(4, 1, 28, 28) * 2 - 1, digits=torch.rand(4, 1, 28, 28) * 2 - 1,
    )
    return box


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_code_block_runs(document, sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox.work)
    skipped = []
    for lang, code, line, skip in code_blocks(document):
        if lang not in ("bash", "python"):
            continue  # output listings and trees
        if skip:
            skipped.append(f"{document.name}:{line}: {skip}")
            continue
        try:
            sandbox.prepare(code)
            sandbox.run_bash(code) if lang == "bash" else sandbox.run_python(code)
        except BaseException as exc:
            where = f"{document.name}:{line}"
            raise AssertionError(f"{where}: the {lang} block fails: {type(exc).__name__}: {exc}") from exc
    with capsys.disabled():
        print(f"\n{document.name}: skipped blocks:\n  " + "\n  ".join(skipped) if skipped else "")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    heads = [m[1] for m in re.finditer(r"(?m)^#+ (.+)$", re.sub(r"(?ms)^```.*?^```", "", path.read_text()))]
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_links_lead_somewhere(document):
    """Every relative link of the docs names a file that exists and, with #anchor, one of its headings."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, f"{document.name}: " + "; ".join(broken)


def test_readme_links_every_guide():
    """The README is the landing page: each guide in docs/ is reachable from it."""
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"guides the README does not link: {unlinked}"
