"""The CPU an attachment costs the bot, per step, and where it runs.

For images of 1 and 10 MiB (and a 1 MiB text file): checking the bytes
(`bot.attachments.sniff_image`, UTF-8), hashing and decrypting an encrypted room's file,
and building the model request (base64 ``data:`` URL and JSON). The last two run in a
worker thread (`trio.to_thread`), so the trio thread is held only by the check; the
figures say how long each would have held it.

    python bench/attachments.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bot.attachments import (
    EncryptedFile,
    LoadedImage,
    decrypt_attachment,
    sniff_image,
)
from bot.backends.context import Turn
from bot.backends.model import ModelBackend, ModelSettings

MiB = 1024 * 1024


def png_of(size: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    filler = os.urandom(size - len(head) - 24)  # random: incompressible, like a photo
    return head + chunk(b"IDAT", filler) + chunk(b"IEND", b"")


def best_ms(step: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    backend = ModelBackend(ModelSettings(base_url="http://127.0.0.1:9/v1", model="m"))
    turns = [Turn("system", "Be brief."), Turn("user", "[image: x.png]\nwhat is this?")]
    print(f"{'step':<44} {'1 MiB':>9} {'10 MiB':>9}  where")
    rows: dict[str, list[float]] = {}
    for size in (MiB, 10 * MiB):
        image = png_of(size)
        assert sniff_image(image) == "image/png"
        key, iv = os.urandom(32), os.urandom(16)
        ciphertext = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(image)
        material = EncryptedFile(key, iv, hashlib.sha256(ciphertext).digest())
        loaded = LoadedImage("image/png", image)
        steps: dict[str, Callable[[], object]] = {
            "check an image's bytes (sniff_image)": partial(sniff_image, image),
            "hash + AES-CTR decrypt (encrypted room)": partial(
                decrypt_attachment, ciphertext, material
            ),
            "model request: data URL + JSON": partial(
                backend._encoded_payload, turns, None, loaded
            ),
        }
        for name, step in steps.items():
            rows.setdefault(name, []).append(best_ms(step, args.repeat))
    where = {
        "check an image's bytes (sniff_image)": "trio thread",
        "hash + AES-CTR decrypt (encrypted room)": "worker thread",
        "model request: data URL + JSON": "worker thread",
    }
    for name, (small, large) in rows.items():
        print(f"{name:<44} {small:>7.1f}ms {large:>7.1f}ms  {where[name]}")
    text = ("x" * 79 + "\n").encode() * (MiB // 80)
    print(f"{'check a 1 MiB text file is UTF-8':<44} {best_ms(text.decode, args.repeat):>7.1f}ms")


if __name__ == "__main__":
    main()
