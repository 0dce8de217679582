"""How long the image check before a run takes (data.coco.CocoDetection.check_images): existence and header of
every file, in threads.

    python bench/check_images.py                          # 100k files, 1 / 4 / 16 threads, warm and cold cache
    python bench/check_images.py --files 20000 --threads 1 8 --cache warm

It writes a COCO JSON and N small JPEG files to a temporary folder (JFIF, quantisation and Huffman tables,
as a camera's or COCO's files have; the header a check reads is the same size whatever the picture's), then
times `check_images` with each thread count, twice: with the files in the page cache ("warm", as just
written), and after asking the kernel to drop their cached pages ("cold": posix_fadvise DONTNEED on each
file; directory entries and inodes stay cached, so a cold disk would add its seek time to this). The table
ends with the time COCO's 118k train + 123k unlabeled + 5k val images would take at each rate. CPU seconds
(all threads) show the work itself where other processes share the cores and stretch the wall time.
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.coco import CocoDetection  # noqa: E402

COCO_IMAGES = 118_287 + 123_403 + 5_000  # train2017 + unlabeled2017 + val2017


def write_files(folder: Path, count: int) -> Path:
    """`count` JPEG files of 16 kinds in `folder` (a few per subfolder-free name) and their COCO JSON."""
    rng = np.random.default_rng(0)
    kinds = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        kinds.append(buffer.getvalue())
    images = []
    for i in range(count):
        name = f"{i:012d}.jpg"
        (folder / name).write_bytes(kinds[i % len(kinds)])
        images.append({"id": i + 1, "file_name": name, "width": 64, "height": 48})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    return path


def drop_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of every file in `folder` (clean pages only: fsync first)."""
    os.sync()
    for entry in os.scandir(folder):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--cache", nargs="+", choices=("warm", "cold"), default=["warm", "cold"])
    parser.add_argument("--dir", default=None, help="where the files go (default: a temporary folder, deleted)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        json_path = write_files(folder, args.files)
        print(f"wrote {args.files} files in {time.perf_counter() - start:.1f} s to {folder}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        start = time.perf_counter()
        dataset = CocoDetection(json_path, folder)
        print(f"read the JSON and built the records in {time.perf_counter() - start:.1f} s", flush=True)

        rows = []
        for threads in args.threads:
            for cache in args.cache:
                if cache == "cold":
                    drop_cache(folder)
                cpu = time.process_time()  # every thread of this process
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # every file is fine: a warning would be a bug
                    found = dataset.check_images(workers=threads)
                cpu = time.process_time() - cpu
                assert found.checked == args.files and found.missing == found.unreadable == 0
                rows.append((threads, cache, found.seconds, cpu))
                print(f"  {threads} threads, {cache}: {found.seconds:.1f} s ({cpu:.1f} s CPU)", flush=True)

    print(f"\n| files | threads | cache | seconds | CPU seconds | files/s | COCO's {COCO_IMAGES // 1000}k images at this "
          f"rate |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for threads, cache, seconds, cpu in rows:
        rate = args.files / seconds
        print(f"| {args.files} | {threads} | {cache} | {seconds:.1f} | {cpu:.1f} | {rate:,.0f} | "
              f"{COCO_IMAGES / rate:.0f} s |")


if __name__ == "__main__":
    main()
