"""The layout's promises: one home per rule, public names that keep working, imports that point
one way (docs/layout.md)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec import Codec
from codec.cli import main
from codec.io import is_mlp_vae, read_config, read_metadata
from codec.latents.scale import spread_sample
from codec.models import build_autoencoder

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("latents", "evaluation", "baseline", "cli")


def top_level_imports(path: Path) -> set[str]:
    """Modules a file imports at module level (late imports inside functions are not counted)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_core_imports_no_subpackage_and_commands_share_only_options():
    for path in (REPO / "codec").glob("*.py"):
        if path.name in ("__init__.py", "__main__.py", "compress.py"):  # public re-exports / entry points
            continue
        bad = [m for m in top_level_imports(path) if m.split(".")[:2] in [["codec", s] for s in SUBPACKAGES]]
        assert not bad, f"core module {path.name} imports {bad}"
    for path in (REPO / "codec" / "cli").glob("*.py"):
        if path.name in ("__init__.py", "parser.py"):
            continue
        others = {m for m in top_level_imports(path) if m.startswith("codec.cli")} - {"codec.cli.options"}
        others = {m for m in others if not m.startswith("codec.cli.options.")}
        assert not others, f"codec/cli/{path.name} imports {others}: command groups share only options"
    for path in (REPO / "codec").rglob("*.py"):
        assert not [m for m in top_level_imports(path) if m == "train" or m.startswith("train.")], path


def test_public_names_and_commands_keep_working(tmp_path):
    from codec import LatentDataset  # noqa: F401  (the public import must resolve)

    for module in ("codec", "codec.compress", "train", "train.ldm"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (module, out.stderr[-400:])
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_one_test_says_whether_a_codec_is_the_mlp_vae(tmp_path):
    from codec.baseline.mlp_vae import MLPVAE

    torch.manual_seed(0)
    mlp, klf8 = MLPVAE(image_size=8, in_channels=1, hidden_sizes=(16,), latent_size=2), build_autoencoder("test")
    Codec(mlp).save_pretrained(tmp_path / "mlp")
    Codec(klf8).save_pretrained(tmp_path / "klf8", meta={"note": "hello"})
    (tmp_path / "pipe" / "vae").mkdir(parents=True)
    Codec(mlp).save_pretrained(tmp_path / "pipe" / "vae")
    answers = [is_mlp_vae(x) for x in (tmp_path / "mlp", str(tmp_path / "pipe"), mlp, dict(mlp.config),
                                       tmp_path / "klf8", klf8, dict(klf8.config), "some/hub-id")]
    assert answers == [True, True, True, True, False, False, False, False]
    assert read_metadata(tmp_path / "klf8")["note"] == "hello" and read_metadata(tmp_path / "none") == {}
    assert read_config(tmp_path / "pipe")["_class_name"] == "MLPVAE"


def test_the_factor_sample_spreads_over_the_whole_dataset():
    picked = spread_sample(1000, 50, seed=0)
    assert len(set(picked)) == 50 and picked == sorted(picked)
    assert min(picked) < 100 and max(picked) > 900  # not the first 50 (one class of a class folder)
    assert picked == spread_sample(1000, 50, seed=0) != spread_sample(1000, 50, seed=1)
    assert spread_sample(10, 50, seed=0) == list(range(10))


@pytest.fixture
def two_class_folder(tmp_path):
    """A class-structured dataset: dark images in a/, bright ones in b/ (first files are all dark)."""
    rng = np.random.default_rng(0)
    for cls, level in (("a", 40), ("b", 215)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(8):
            arr = np.clip(level + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / cls / f"{i}.png")
    return tmp_path / "data"


def test_export_and_scale_measure_alike_and_keep_the_normalisation(tmp_path, two_class_folder):
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"))
    codec.set_factors(1.0, None, [0.0] * 4, [1.0] * 4)  # a per-channel codec
    codec.save_pretrained(tmp_path / "codec")
    args = ["--resolution", "16", "--samples", "6"]
    assert main(["export", str(tmp_path / "codec"), str(tmp_path / "exported"), "--data", str(two_class_folder),
                 *args]) == 0
    assert main(["scale", "--codec", str(tmp_path / "codec"), "--output", str(tmp_path / "scaled"), "--input",
                 str(two_class_folder), "--per-channel", "--num-workers", "0", *args]) == 0
    exported, scaled = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("exported", "scaled"))
    assert exported["scaling_factor"] == 1.0 and exported["shift_factor"] is None  # still per-channel
    for key in ("latents_mean", "latents_std"):
        assert exported[key] == pytest.approx(scaled[key], abs=1e-6) and exported[key] != [0.0] * 4
    picked = spread_sample(16, 6, seed=0)  # the images both measured: from both classes
    assert any(i < 8 for i in picked) and any(i >= 8 for i in picked)
    stats = json.loads((tmp_path / "exported" / "vae_codec.json").read_text())["latent_stats"]
    assert stats["num_images"] == 6 and stats["seed"] == 0


def _train_module_imports() -> dict[str, set[str]]:
    """train.* module -> the train.* modules it imports anywhere (late imports in functions too)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "train").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_train_has_no_import_cycle_and_its_layers_point_down():
    graph = _train_module_imports()
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # train.common serves both trainers and imports neither; the trainers do not import each other.
    for module, imports in graph.items():
        if module.startswith("train.common"):
            assert not {m for m in imports if m.startswith(("train.autoencoder", "train.diffusion"))}, module
        if module.startswith("train.diffusion"):
            assert not {m for m in imports if m.startswith("train.autoencoder")}, module
        if module.startswith("train.autoencoder"):
            assert not {m for m in imports if m.startswith("train.diffusion")}, module


def test_the_trainers_entry_points_and_public_names_keep_working():
    for module in ("train.distill",):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (module, out.stderr[-400:])
    from train.ldm import LatentStream, main, sample_latents, train_ldm  # noqa: F401  (README's names)


def test_help_and_argument_errors_load_no_model_library():
    """`vae-codec --help`, a mistyped argument and `python -m train --help-config` answer without
    importing torch or diffusers (they took seconds before the imports moved into the commands)."""
    probe = ("import sys, runpy\n"
             "sys.argv = ARGV\n"
             "try:\n    runpy.run_module(MODULE, run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))\n")
    for module, argv in (("codec.cli.parser", ["vae-codec", "--help"]), ("codec.cli.parser", ["vae-codec", "encode"]),
                         ("train", ["train", "--help-config"]), ("train.ldm", ["train.ldm", "--help"])):
        code = probe.replace("ARGV", repr(argv)).replace("MODULE", repr(module))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert "HEAVY []" in out.stdout, (module, argv, out.stdout[-300:], out.stderr[-300:])


def test_the_cli_choices_are_the_implementations():
    from codec import choices, equivariance, tiling
    from codec.latents import shards

    assert tiling.METHODS == choices.TILE_METHODS and set(shards.LATENT_DTYPES) == set(choices.LATENT_DTYPE_NAMES)
    assert set(equivariance.TRANSFORMS) == set(choices.TRANSFORMS) and shards.STORES == choices.STORES
