"""``vae-codec eval``: metrics, pictures and an HTML report for codecs (the work is
:mod:`codec.evaluation`; MLP VAE codecs and array datasets go to :mod:`codec.baseline`)."""

from __future__ import annotations

from codec.choices import DEFAULT_TRANSFORMS, TRANSFORMS
from codec.cli.options import memory_arg, source_args


def register(sub) -> None:
    """Add ``eval``. Not :func:`codec.cli.options.codec_args`: here ``--codec`` repeats, and one
    image at a time makes --batch-size meaningless."""
    p = sub.add_parser("eval", help="metrics, pictures and an HTML report for one or more codecs")
    p.add_argument("--codec", action="append", required=True,
                   help="codec folder (ours, any diffusers AutoencoderKL or AutoencoderTiny); repeat "
                        "to compare; the first one picks the worst images and the reference rate")
    p.add_argument("--data", required=True,
                   help="images: any source compress takes (folder, file list, .tar or brace pattern, URL / pipe: "
                        "stream, hf:NAME or save_to_disk folder); for MLP VAE codecs also an .npz / idx folder "
                        "(test split). A stream is read once and held encoded in memory: use --limit")
    source_args(p)
    memory_arg(p)
    p.add_argument("--out", required=True, help="folder for metrics.json, per_image.csv, report.html")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--worst", type=int, default=4, help="how many worst images (by PSNR) to show")
    p.add_argument("--crop", type=int, default=128, help="side of the picture crops, in pixels")
    p.add_argument("--no-classical", action="store_true", help="leave out the JPEG and WebP references")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="split the images over N processes on this machine (one per GPU where there are GPUs, "
                        "else CPU processes); under torchrun or accelerate launch the launcher's processes are used")
    p.add_argument("--protocol", default="full", type=protocol_value, metavar="full|SIDE",
                   help="full: every image at full resolution (default); 256: the published protocol (short side "
                        "resized to 256, centre crop 256x256), the one rFID tables use")
    p.add_argument("--transforms", default=",".join(DEFAULT_TRANSFORMS),
                   help="comma-separated transforms of the latent-space measures (equivariance error; "
                        f"from {', '.join(TRANSFORMS)}), or 'none' to leave the measures out")
    p.add_argument("--vf-model", default=None, metavar="MODEL",
                   help="also measure how aligned each codec's latents are with this vision foundation model "
                        "(VA-VAE's cosine and distance-matrix terms): dinov2-small, dinov2-base, a DINOv2 Hub id "
                        "or folder (needs transformers), or vgg16 (offline)")
    # The vanilla VAE baseline (MLPVAE codecs) is evaluated as in the VAE literature (vae_eval).
    p.add_argument("--nll-samples", type=int, default=None,
                   help="MLP VAE codecs: importance samples k for log p(x) (Burda et al. use 5000; 0: ELBO only)")
    p.add_argument("--binarize", default=None, choices=["auto", "yes", "no"],
                   help="MLP VAE codecs: binarise the test set once (auto: when the model trained on binarised data)")
    p.add_argument("--seed", type=int, default=None,
                   help="MLP VAE codecs (default 0): seed of the binarisation and samples")
    p.set_defaults(func=cmd_eval)


def without_num_processes(argv: list[str]) -> list[str]:
    """The command line a worker runs: the same, less --num-processes (it is one of them)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            out.append(arg)
    return out


def protocol_value(text: str) -> int | None:
    """--protocol: 'full' or a square side in pixels, a multiple of 8."""
    import argparse

    if text == "full":
        return None
    if not text.isdigit() or int(text) < 8 or int(text) % 8:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'full' or a side in pixels that is a multiple of 8, "
                                         "e.g. 256 (the published protocol)")
    return int(text)


def cmd_eval(args) -> int:
    import os

    from codec.launch import relaunch_if_needed, start_processes

    if args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return start_processes("codec", without_num_processes(args.argv), args.num_processes)
    code = relaunch_if_needed("codec", args.argv)  # accelerate launch --cpu --num_processes N
    if code is not None:
        return code
    from codec.baseline.arrays import is_array_source
    from codec.evaluation.evaluate import evaluate, summary_table
    from codec.io import is_mlp_vae

    if args.vf_model is not None and any(is_mlp_vae(c) for c in args.codec):
        raise ValueError("--vf-model measures a latent grid's alignment; an MLP VAE has none")
    if any(is_mlp_vae(c) for c in args.codec) or is_array_source(args.data):
        from codec.baseline.evaluate import evaluate_vae, summary

        if len(args.codec) != 1:
            raise ValueError("MLP VAE evaluation takes one --codec")
        if "WORLD_SIZE" in os.environ:
            raise ValueError("an MLP VAE is evaluated in one process (its test set takes seconds)")
        if args.protocol is not None:
            raise ValueError("--protocol applies to image codecs; an MLP VAE is evaluated at its own size")
        report = evaluate_vae(args.codec[0], args.data, args.out,
                              nll_samples=5000 if args.nll_samples is None else args.nll_samples,
                              limit=args.limit, binarize_mode=args.binarize or "auto", seed=args.seed or 0,
                              device=args.device)
        print(summary(report))
        print(f"written to {args.out}/metrics.json (+ samples.png, interpolation.png, reconstructions.png)")
        return 0
    if args.nll_samples is not None or args.binarize is not None or args.seed is not None:
        raise ValueError("--nll-samples, --binarize and --seed apply to MLP VAE codecs only "
                         "(kl-f8 codecs have no tractable log p(x) here)")
    report = evaluate(args.codec, args.data, args.out, device=args.device, dtype=args.dtype,
                      limit=args.limit, worst=args.worst, crop_size=args.crop,
                      classical=not args.no_classical, image_column=args.image_column, split=args.split,
                      streaming=args.streaming, max_memory=args.max_memory, protocol=args.protocol,
                      transforms=[] if args.transforms == "none" else args.transforms.split(","),
                      vf_model=args.vf_model)
    if int(os.environ.get("RANK", "0")):
        return 0  # the main process reports
    print(summary_table(report))
    for notice in report["notices"]:
        print(f"note: {notice}")
    print(f"{report['images']} images; written to {args.out}/report.html (+ metrics.json, per_image.csv)")
    return 0
