"""Wan Studio: Wan 2.1 / 2.2 video generation.

The public Python API (a contract relied on by outside checks, see DESIGN.md):

    dit  = wan.load_transformer(path, device="cpu", dtype=torch.float32)
    vae  = wan.load_vae(path, device="cpu", dtype=torch.float32)
    te   = wan.load_text_encoder(path, device="cpu", dtype=torch.float32)
    clip = wan.load_clip(path, device="cpu", dtype=torch.float32)

Imports are lazy so that ``import wan`` stays cheap (the web app starts before torch is needed).
"""

__version__ = "0.1.0"


def load_transformer(path, device="cpu", dtype=None, **kwargs):
    from wan.loading.transformer import load_transformer as _load
    return _load(path, device=device, dtype=dtype, **kwargs)


def load_vae(path, device="cpu", dtype=None, **kwargs):
    from wan.loading.vae import load_vae as _load
    return _load(path, device=device, dtype=dtype, **kwargs)


def load_text_encoder(path, device="cpu", dtype=None, **kwargs):
    from wan.loading.text_encoder import load_text_encoder as _load
    return _load(path, device=device, dtype=dtype, **kwargs)


def load_clip(path, device="cpu", dtype=None, **kwargs):
    from wan.loading.clip import load_clip as _load
    return _load(path, device=device, dtype=dtype, **kwargs)


__all__ = ["load_transformer", "load_vae", "load_text_encoder", "load_clip", "__version__"]
