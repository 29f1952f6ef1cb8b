"""``ModelSpec.dit_config()``: the one conversion from a registry spec to a DiT configuration equals
what the TEST family's checkpoints hold, read off their tensor shapes by the loader; the LoRA
check of a model that is not loaded (UI, ``wgp.py lora check``) sees the same layers."""

import pytest
import torch

import wan
from wan.lora.compat import linear_shapes, model_linear_shapes
from wan.models.dit import DiTConfig
from wan.registry import get_model, list_models
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return root


@pytest.mark.parametrize("model_id", [m.id for m in list_models() if m.test_model])
def test_spec_config_equals_the_checkpoint(model_id, ckpts):
    from wan.loading.download import ensure_files
    spec = get_model(model_id)
    paths = ensure_files(spec, ckpts, variant="fp32")
    for role in spec.transformer_roles:
        dit = wan.load_transformer(paths[role], dtype=torch.float32)
        assert DiTConfig(**spec.dit_config()) == dit.config
        assert model_linear_shapes(spec) == linear_shapes(dit)
