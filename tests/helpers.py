"""Builders shared by several test modules: a synthetic manifest and a folder of bad images."""
import hashlib
import json

import numpy as np
from deedsr.runtime.contract import ADAPTER, LEARNER, REQUIRED_GRAPHS, ROLES, SCHEMA, SCHEMA_VERSION, UNET, \
    VAE_DECODER, VAE_ENCODER
from PIL import Image

GRAPHS = REQUIRED_GRAPHS
CONDITIONS = ("da0_kernel1", "da0_scale1")
TILE = ["batch", 4, "tile_height", "tile_width"]
LOCAL = [("local_0", ["batch", 32, "tile_height", "tile_width"]),
         ("tokens", ["batch", "tile_height/8*tile_width/8", 64])]


def contract_io(name, condition_names=CONDITIONS):
    """(inputs, outputs) of a graph as the contract links them: [(name, shape)]."""
    conditions = [(c, ["batch", 32, 3, 3] if "kernel" in c else ["batch", 32]) for c in condition_names]
    table = {
        LEARNER: ([("lr", ["batch", 3, "lr_height", "lr_width"])], [("degradation", ["batch", 64]), *conditions]),
        VAE_ENCODER: ([("image", ["batch", 3, "image_height", "image_width"])],
                      [("latent", ["batch", 4, "image_height/8", "image_width/8"])]),
        ADAPTER: ([("z_lr", TILE), ("timestep", ["batch"]), *conditions], LOCAL),
        UNET: ([("x_t", TILE), ("timestep", ["batch"]), *LOCAL], [("eps", TILE)]),
        VAE_DECODER: ([("latent", ["batch", 4, "latent_height", "latent_width"])],
                      [("image", ["batch", 3, "latent_height*8", "latent_width*8"])]),
    }
    return table[name]


def manifest_dict(root, precisions=("fp32",), lr=(16, 32, 512), tile=16, conditions=CONDITIONS):
    def rng(lo, opt, hi):
        return {"min": lo, "opt": opt, "max": hi}

    image = [((v + 15) // 16 * 16) * 4 for v in lr]
    latent = [v // 8 for v in image]
    dims = {"batch": rng(1, 1, 4), "lr_height": rng(*lr), "lr_width": rng(*lr), "image_height": rng(*image),
            "image_width": rng(*image), "latent_height": rng(*latent), "latent_width": rng(*latent),
            "tile_height": rng(8, tile, tile), "tile_width": rng(8, tile, tile)}
    graphs = {}
    for name in GRAPHS:
        inputs, outputs = contract_io(name, conditions)
        entry = {"stage": ROLES[name].stage,
                 "inputs": [{"name": n, "shape": s} for n, s in inputs],
                 "outputs": [{"name": n, "shape": s} for n, s in outputs],
                 "precisions": {}}
        for p in precisions:
            f = root / p / f"{name}.onnx"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"0123456789")
            entry["precisions"][p] = {"file": f"{p}/{name}.onnx", "external_data": None, "bytes": 10,
                                      "sha256": hashlib.sha256(b"0123456789").hexdigest(),
                                      "dtypes": {n: "float32" for n, _ in inputs + outputs}}
        graphs[name] = entry
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "opset": 17,
        "model": {"preset": "tiny", "config": {}},
        "image": {"upscale": 4, "latent_downscale": 8, "latent_multiple": 8, "latent_channels": 4,
                  "pixel_multiple": 16},
        "vae": {"scaling_factor": 0.18215},
        "scheduler": {"num_train_timesteps": 1000, "alphas_cumprod": list(np.linspace(0.999, 0.005, 1000)),
                      "prediction_type": "epsilon", "steps_offset": 1},
        "sampler": {"steps": 50, "eta": 1.0, "noise_guidance_steps": [0], "init": "noise", "tile": tile,
                    "tile_overlap": tile // 2, "tile_weight_variance": 0.01, "color_fix": "none"},
        "dims": dims,
        "conditions": list(conditions),
        "graphs": graphs,
    }


def write(root, data):
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def make_bad_inputs(folder, photo):
    folder.mkdir()
    Image.fromarray(photo).save(folder / "good.png")
    (folder / "text.png").write_text("hello")
    Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray(photo[..., 0]).save(folder / "gray.png")
    Image.fromarray(photo[..., 0].astype(np.uint16) * 200).save(folder / "deep.png")
    Image.fromarray(photo[:1, :1]).save(folder / "dot.png")
    return {"text.png": "not an image", "alpha.png": "alpha channel", "gray.png": "grayscale",
            "deep.png": "not 8-bit", "dot.png": "1x1"}
