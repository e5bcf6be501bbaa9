#!/usr/bin/env python3
"""Write an OCI image layout (tag "test") of one gzip layer holding N small files.

    gen-small-files.py N DIR

Files are 0-2047 bytes of text (sizes and contents derived from the file number, so the
image is the same on every run), 100 per directory, two directory levels, plus /etc and
/bin so that tools treat it as a root filesystem. Used by scripts/bench.sh for the scaling
series.
"""
import gzip
import hashlib
import io
import os
import shutil
import sys
import tarfile

from ocilayout import finish


def main():
    n, out = int(sys.argv[1]), sys.argv[2]
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(f"{tmp}/blobs/sha256")
    tar_path = f"{tmp}/layer.tar"
    mtime = 1_700_000_000
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add_dir(name):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
            tf.addfile(ti)
        for d in ("etc", "bin", "data"):
            add_dir(d)
        for i in range(n):
            top, sub = i // 10000, (i // 100) % 100
            if i % 10000 == 0:
                add_dir(f"data/{top:03d}")
            if i % 100 == 0:
                add_dir(f"data/{top:03d}/{sub:02d}")
            size = (i * 2654435761) % 2048
            line = f"file {i} of {n}\n".encode()
            content = (line * (size // len(line) + 1))[:size]
            ti = tarfile.TarInfo(f"data/{top:03d}/{sub:02d}/f{i:06d}.txt")
            ti.size, ti.mode, ti.mtime = size, 0o644, mtime
            tf.addfile(ti, io.BytesIO(content))
    h = hashlib.sha256()
    gz_path = tar_path + ".gz"
    with open(tar_path, "rb") as src, open(gz_path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                gz.write(chunk)
    os.unlink(tar_path)
    diff_id = "sha256:" + h.hexdigest()
    gh = hashlib.sha256()
    with open(gz_path, "rb") as f:
        while chunk := f.read(1 << 20):
            gh.update(chunk)
    layer_digest = "sha256:" + gh.hexdigest()
    layer_size = os.path.getsize(gz_path)
    os.rename(gz_path, f"{tmp}/blobs/sha256/{layer_digest[7:]}")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
               "digest": layer_digest, "size": layer_size}]
    finish(tmp, out, config, layers)

if __name__ == "__main__":
    main()
