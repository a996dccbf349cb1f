"""The checks the three training scripts' configurations share (attnchain.zoo._training)."""
import pytest

from attnchain.zoo import train_scene_flux, train_scene_unet, train_scene_vit


@pytest.mark.parametrize("module", [train_scene_vit, train_scene_flux, train_scene_unet])
@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps and batch_size must be positive"),
    (dict(batch_size=0), "steps and batch_size must be positive"),
    (dict(batch_size=3, chunk_size=8), "chunk_size 8 must be a multiple of batch_size 3"),
])
def test_training_configs_share_the_schedule_checks(module, bad, match):
    module.TrainConfig(batch_size=4, chunk_size=8)  # valid
    with pytest.raises(ValueError, match=match):
        module.TrainConfig(**{"batch_size": 4, "chunk_size": 8, **bad})
