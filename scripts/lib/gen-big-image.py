#!/usr/bin/env python3
"""Write a multi-GB OCI image layout (tag "test") like an ML or language-runtime image.

    gen-big-image.py DIR [DEBOOTSTRAP_TARBALL]

Three gzip layers (level 6; pigz if installed, else Python's zlib):
  1. base     a Debian bookworm tree: the .debs of the cached debootstrap minbase tarball
              (scripts/make-test-images.sh keeps it in /var/tmp/fledge-test-images/cache)
              plus perl and python3.11, unpacked with merged /usr
  2. runtime  tens of thousands of files of language runtimes and headers (boost, the
              kernel's headers, Go's sources, numpy/scipy/sympy/pandas, LLVM, Rust's
              standard library, OpenJDK), unpacked from Debian packages
  3. weights  /opt/model: 20 files of 41-79 MiB as model weights: 4 MiB chunks that
              alternate between pseudo-random bytes and sparse ones (1 KiB random, 3 KiB
              zeros), so about half the data is incompressible

The .debs are downloaded once (`apt-get download`) into DIR/../debs and reused. Contents are
fixed by the cached .debs and a seed (the weights), mtimes and owners by the packages or
constants, so every run writes the same layer tars (the same diff_ids; the compressed bytes
also depend on the compressor, pigz or zlib). Written to DIR.tmp, then renamed to DIR.
Used by scripts/bench.sh for the `big` series.
"""
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time

from ocilayout import finish

MTIME = 1_700_000_000
SEED = "fledge-big-image-v1"
MIB = 1 << 20
CHUNK = 4 * MIB
# Packages beside the minbase ones in the base layer, and the runtime layer's packages.
# The kernel headers' package name carries the ABI version: resolved through
# linux-headers-amd64 when the .debs are first downloaded.
BASE_EXTRA = [
    "perl", "perl-modules-5.36", "libperl5.36", "python3.11", "python3.11-minimal",
    "libpython3.11-minimal", "libpython3.11-stdlib", "libssl3", "openssl", "ca-certificates",
    "libsqlite3-0", "libexpat1", "libreadline8", "libncursesw6", "libgdbm6", "cpp-12", "libicu72",
]
RUNTIME = [
    "libboost1.74-dev", "@linux-headers-common", "golang-1.19-src", "libpython3.11-testsuite",
    "python3-numpy", "python3-scipy", "python3-sympy", "python3-mpmath", "python3-pandas",
    "python3-pandas-lib", "python3-matplotlib", "libllvm14", "libstd-rust-dev",
    "openjdk-17-jre-headless", "openjdk-17-jdk-headless", "libclang-cpp14", "g++-12", "libnode108",
]
MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def log(msg):
    print(f"gen-big-image: {msg}", file=sys.stderr, flush=True)


def kernel_headers_common():
    out = subprocess.run(["apt-cache", "depends", "linux-headers-amd64"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        dep = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-headers-"):
            return dep.removesuffix("-amd64") + "-common"
    sys.exit("gen-big-image: no linux-headers-*-amd64 behind linux-headers-amd64 (apt-get update?)")


def fetch_debs(debs_dir, tarball):
    """The cached .debs: DEBS/minbase (from the debootstrap tarball), DEBS/base, DEBS/runtime.

    DEBS/complete names the package lists they were downloaded for; other lists download
    again."""
    want = json.dumps({"base": BASE_EXTRA, "runtime": RUNTIME})
    try:
        with open(f"{debs_dir}/complete") as f:
            if f.read() == want:
                return
    except FileNotFoundError:
        pass
    tmp = debs_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("minbase", "base", "runtime"):
        os.makedirs(f"{tmp}/{sub}")
    log(f"unpacking the minbase .debs of {tarball}")
    with tarfile.open(tarball) as tf:
        for m in tf:
            if m.isreg() and m.name.endswith(".deb") and "/archives/" in m.name:
                with tf.extractfile(m) as src, open(f"{tmp}/minbase/{os.path.basename(m.name)}", "wb") as dst:
                    shutil.copyfileobj(src, dst)
    for sub, names in (("base", BASE_EXTRA), ("runtime", RUNTIME)):
        names = [kernel_headers_common() if n == "@linux-headers-common" else n for n in names]
        log(f"apt-get download into {debs_dir}/{sub}: {' '.join(names)}")
        # apt's sandbox user cannot write to root's directories: download as root, quietly.
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *names],
                       cwd=f"{tmp}/{sub}", check=True, stdout=subprocess.DEVNULL)
    with open(f"{tmp}/complete", "w") as f:
        f.write(want)
    shutil.rmtree(debs_dir, ignore_errors=True)
    os.rename(tmp, debs_dir)


class LayerOut:
    """A gzip layer file written through pigz (or zlib), the uncompressed bytes hashed."""

    def __init__(self, path):
        self.path, self.diff, self.offset = path, hashlib.sha256(), 0
        self.raw = open(path, "wb")
        if shutil.which("pigz"):
            self.proc = subprocess.Popen(["pigz", "-6", "-n", "-c"], stdin=subprocess.PIPE,
                                         stdout=self.raw)
            self.sink = self.proc.stdin
        else:
            self.proc = None
            self.sink = gzip.GzipFile(fileobj=self.raw, mode="wb", compresslevel=6, mtime=0)

    def write(self, data):
        self.diff.update(data)
        self.sink.write(data)
        self.offset += len(data)
        return len(data)

    def tell(self):
        return self.offset

    def close(self):
        self.sink.close()
        if self.proc and self.proc.wait() != 0:
            sys.exit("gen-big-image: pigz failed")
        self.raw.close()


def norm(name):
    """A tar member name without ./ or /, the merged-/usr directories moved under usr/."""
    name = name.removeprefix("./").strip("/")
    if name.split("/", 1)[0] in MERGED:
        name = "usr/" + name
    return name


def add_dir(tf, name, mode=0o755):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, MTIME
    tf.addfile(ti)


def copy_debs(tf, debs):
    """Every .deb's files into tf, in name order; the first of a repeated path wins."""
    seen = set()
    for deb in debs:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as src:
            for m in src:
                name = norm(m.name)
                if not name or name in seen or name in MERGED:
                    continue
                seen.add(name)
                m.name = name
                if m.islnk():
                    m.linkname = norm(m.linkname)
                tf.addfile(m, src.extractfile(m) if m.isreg() else None)
        if proc.wait() != 0:
            sys.exit(f"gen-big-image: dpkg-deb --fsys-tarfile {deb} failed")
    return len(seen)


class Weights:
    """Pseudo-random (seeded) model weights, read in chunks: random and sparse alternate."""

    def __init__(self, i, size):
        self.rng, self.left, self.n = random.Random(f"{SEED}-{i}"), size, 0
        self.zeros = bytes(3072)

    def read(self, want=-1):
        n = min(self.left, CHUNK)
        if n <= 0:
            return b""
        if self.n % 2 == 0:
            data = self.rng.randbytes(n)
        else:
            rnd = self.rng.randbytes((n + 3) // 4)
            data = b"".join(rnd[j:j + 1024] + self.zeros for j in range(0, len(rnd), 1024))[:n]
        self.n += 1
        self.left -= n
        return data


def write_layer(tmp, name, fill):
    t0 = time.monotonic()
    out = LayerOut(f"{tmp}/{name}.tar.gz")
    # Mode "w", not the stream mode "w|": that one re-slices its buffer for every 10 KiB.
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.copybufsize = CHUNK
        entries = fill(tf)
    out.close()
    h = hashlib.sha256()
    with open(out.path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    digest, size = "sha256:" + h.hexdigest(), os.path.getsize(out.path)
    os.rename(out.path, f"{tmp}/blobs/sha256/{digest[7:]}")
    log(f"layer {name}: {entries} entries, {size / MIB:.0f} MiB compressed, "
        f"{time.monotonic() - t0:.0f} s")
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest,
            "size": size}, "sha256:" + out.diff.hexdigest()


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1].rstrip("/")
    tarball = sys.argv[2] if len(sys.argv) == 3 else \
        "/var/tmp/fledge-test-images/cache/debootstrap-bookworm-minbase-amd64.tgz"
    t0 = time.monotonic()
    debs_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "debs")
    fetch_debs(debs_dir, tarball)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(f"{tmp}/blobs/sha256")

    def debs(*subs):
        return sorted(f"{debs_dir}/{s}/{f}" for s in subs for f in os.listdir(f"{debs_dir}/{s}")
                      if f.endswith(".deb"))

    def base(tf):
        add_dir(tf, "usr")
        for d in MERGED:
            ti = tarfile.TarInfo(d)
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "usr/" + d, 0o777, MTIME
            tf.addfile(ti)
        return len(MERGED) + 1 + copy_debs(tf, debs("minbase", "base"))

    def runtime(tf):
        return copy_debs(tf, debs("runtime"))

    def weights(tf):
        add_dir(tf, "opt")
        add_dir(tf, "opt/model")
        for i in range(20):
            size = (41 + 2 * ((i * 7) % 20)) * MIB + i * 4099
            ti = tarfile.TarInfo(f"opt/model/weights-{i:02d}-of-20.bin")
            ti.size, ti.mode, ti.mtime = size, 0o644, MTIME
            tf.addfile(ti, Weights(i, size))
        return 22

    layers, diff_ids = [], []
    for name, fill in (("base", base), ("runtime", runtime), ("weights", weights)):
        desc, diff_id = write_layer(tmp, name, fill)
        layers.append(desc)
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/usr/bin/python3.11"], "WorkingDir": "/opt/model"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    finish(tmp, out, config, layers)
    log(f"{out} written in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
