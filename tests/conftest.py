import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from deedsr.config import preset
    from deedsr.models import DeeDSR

    torch.manual_seed(0)
    model = DeeDSR(preset("tiny")).eval()
    # Untrained modulation is identity; give it weights so the tests exercise it.
    with torch.no_grad():
        for m in model.unet.modulation:
            m.gamma.weight.normal_(0, 0.02)
            m.beta.weight.normal_(0, 0.02)
    return model


@pytest.fixture(scope="session")
def photo():
    """A real photo from scikit-image, 48x40 (an LR input)."""
    from PIL import Image
    from skimage import data  # here, not at the top: the serve environment has no scikit-image

    return np.asarray(Image.fromarray(data.coffee()).resize((48, 40), Image.BICUBIC))


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_model, tmp_path_factory):
    """The tiny model exported once per session: fp32 + fp16, with the fused denoiser,
    latent tile 16 so that small test images already need aggregation."""
    from deedsr.export.engine_dir import export_engine_dir

    out = tmp_path_factory.mktemp("engines") / "tiny"
    return export_engine_dir(tiny_model, out, tile=16, min_size=16, max_size=128, max_batch=4, fuse_denoiser=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model gains nothing from more threads, and torch's OpenMP pool collapses when
    another process holds a core (18 s instead of 0.26 s for a 4-step reference sample)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
