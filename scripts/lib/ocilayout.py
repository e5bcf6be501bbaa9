"""The OCI image layout the benchmark's image generators write (imported by
gen-small-files.py and gen-big-image.py from this directory).

    blob(root, data)                      store bytes as a blob: ("sha256:<hex>", size)
    finish(tmp, out, config, layers)      write config, manifest, index.json (tag "test")
                                          and oci-layout into tmp, then rename tmp to out
"""
import hashlib
import json
import os
import shutil


def blob(root, data):
    d = hashlib.sha256(data).hexdigest()
    with open(f"{root}/blobs/sha256/{d}", "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)


def finish(tmp, out, config, layers):
    """Complete the layout in `tmp` whose layer blobs are there already (`layers`: their
    descriptors, in order) and move it to `out`, replacing what was there."""
    cfg_digest, cfg_size = blob(tmp, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_digest, "size": cfg_size},
        "layers": layers,
    }
    m_digest, m_size = blob(tmp, json.dumps(manifest).encode())
    with open(f"{tmp}/index.json", "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m_digest, "size": m_size,
            "annotations": {"org.opencontainers.image.ref.name": "test"}}]}, f)
    with open(f"{tmp}/oci-layout", "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
