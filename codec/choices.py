"""The named choices the command line offers, in a module that imports nothing heavy, so that
``vae-codec --help`` and argument errors answer at once (the modules that implement each choice
import them from here: one home)."""

TILE_METHODS = ("exact", "stats", "blend")  # codec.tiling
DEFAULT_TILE_METHOD = "exact"
TRANSFORMS = ("down2", "down4", "rot90", "rot180", "rot270")  # codec.equivariance
DEFAULT_TRANSFORMS = ["down2", "down4", "rot90"]
STORES = ("mean", "sample", "mean_std")  # codec.latents.shards
LATENT_DTYPE_NAMES = ("bf16", "fp16", "fp32")
