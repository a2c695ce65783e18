"""A distilled AutoencoderTiny student against its teacher, side by side on an image folder:

* decode speed: images/s decoding the teacher's latents with the teacher and with the student,
  alternating in one process over ``--repeats`` rounds (min and median reported);
* quality: PSNR of the student's decoding against the teacher's decoding of the same latents,
  and of each against the original images; PSNR of the student's own round trip.

    .venv/bin/python -m scripts.bench_distill --teacher T --student S --images ../shared/data/kodak
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from codec import Codec
from codec.images import center_crop_multiple, list_images, load_image, pil_to_tensor


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """On 8-bit pixels, as `vae-codec eval` measures it."""
    a8 = ((a.clamp(-1, 1) + 1) * 127.5).round()
    b8 = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = float((a8 - b8).pow(2).mean())
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf


def timed_decode(codec: Codec, latents: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    out = [codec.decode(z) for z in latents]
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = Codec.from_pretrained(args.teacher, device="cpu", batch_size=1)
    student = Codec.from_pretrained(args.student, device="cpu", batch_size=1)
    files = list_images(args.images)[: args.limit or None]
    images = [center_crop_multiple(pil_to_tensor(load_image(p))[None]) for p in files]
    latents = [teacher.encode(x) for x in images]

    times = {"teacher": [], "student": []}
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both alike
        for name, codec in (("teacher", teacher), ("student", student)):
            seconds, decoded = timed_decode(codec, latents)
            times[name].append(seconds)
            if name == "teacher":
                by_teacher = decoded
            else:
                by_student = decoded
    n = len(images)
    print(f"{n} images, {tuple(images[0].shape[-2:])} first; torch threads {torch.get_num_threads()}")
    print("decode images/s     min-time  median-time (of {} rounds)".format(args.repeats))
    for name, t in times.items():
        print(f"  {name:8s}  {n / min(t):8.2f}  {n / statistics.median(t):8.2f}")
    print(f"  student/teacher speed: {min(times['teacher']) / min(times['student']):.2f}x (best rounds), "
          f"{statistics.median(times['teacher']) / statistics.median(times['student']):.2f}x (medians)")

    own = [student.decode(student.encode(x)) for x in images]
    rows = {
        "student vs teacher decoding (teacher latents)": [psnr(s, t) for s, t in zip(by_student, by_teacher)],
        "teacher decoding vs originals": [psnr(t, x) for t, x in zip(by_teacher, images)],
        "student decoding of teacher latents vs originals": [psnr(s, x) for s, x in zip(by_student, images)],
        "student round trip (its encoder) vs originals": [psnr(s, x) for s, x in zip(own, images)],
    }
    print("PSNR (dB, 8-bit)                                   mean    min")
    for label, values in rows.items():
        print(f"  {label:48s} {statistics.mean(values):6.2f} {min(values):6.2f}")


if __name__ == "__main__":
    main()
