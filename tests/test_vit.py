"""The ViT: dense or MoBA attention, patch sizes down to one pixel, and its place in the trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from neuroplast.models import ViT, build_model
from neuroplast.models.vit import square_tile
from neuroplast.train import ConfigError, RunConfig, train
from neuroplast.train.trainer import Run


@pytest.mark.parametrize(
    "shape,patch,block", [((1, 28, 28), 1, 16), ((1, 28, 28), 2, 14), ((1, 28, 28), 4, 7), ((3, 32, 32), 1, 16)]
)
def test_vit_shapes_for_mnist_and_cifar_patch_grids(shape, patch, block):
    model = ViT(shape, 10, patch_size=patch, dim=16, depth=2, heads=2, attention="moba", block_size=block, top_k=2)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_moba_vit_covering_every_block_equals_the_dense_vit():
    """Tiles reorder the tokens, MoBA picks blocks; with every block picked it is dense attention."""
    torch.manual_seed(0)
    moba = ViT((1, 8, 8), 10, patch_size=1, dim=16, depth=2, heads=2, attention="moba", block_size=16, top_k=4)
    dense = ViT((1, 8, 8), 10, patch_size=1, dim=16, depth=2, heads=2, attention="dense")
    dense.load_state_dict(moba.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(moba(x), dense(x), atol=1e-5, rtol=1e-5)
    # with fewer blocks the outputs differ, and the hybrid's last layer is dense
    sparse = ViT((1, 8, 8), 10, patch_size=1, dim=16, depth=2, heads=2, attention="moba", block_size=16, top_k=2)
    sparse.load_state_dict(moba.state_dict())
    assert not torch.allclose(sparse(x), dense(x), atol=1e-4)
    hybrid = ViT(
        (1, 8, 8), 10, patch_size=1, dim=16, depth=2, heads=2, attention="moba", block_size=16, top_k=2, full_layers=1
    )
    assert hybrid.blocks[1].attention.full and not hybrid.blocks[0].attention.full


def test_tile_order_once_per_forward_equals_reordering_in_every_layer():
    """The ViT puts its tokens in tile order once; reordering inside each MoBA layer (and back)
    gives the same model."""
    torch.manual_seed(0)
    once = ViT((1, 8, 8), 10, patch_size=1, dim=16, depth=3, heads=2, attention="moba", block_size=16, top_k=2)
    once.blocks[2].attention.full = True  # a dense last layer too
    per_layer = copy.deepcopy(once)
    per_layer.tiles = None
    for block in per_layer.blocks:
        block.attention.tiles = once.tiles  # the one tile-order mechanism, used by both
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(once(x), per_layer(x), atol=1e-5, rtol=1e-5)
    ordered = once.tiles.order.view(4, 16)  # four blocks of 16 tokens
    rows, cols = ordered // 8, ordered % 8
    assert ((rows.amax(1) - rows.amin(1)) == 3).all() and ((cols.amax(1) - cols.amin(1)) == 3).all()  # 4x4 tiles


def test_square_tiles_and_bad_blocks():
    assert square_tile(28, 28, 16) == (4, 4)
    assert square_tile(14, 14, 14) in {(2, 7), (7, 2)}
    with pytest.raises(
        ValueError, match="block_size 16 cannot be a tile of the 14x14 patch grid; choose from: 1, 2, 4, 7, 14"
    ):
        square_tile(14, 14, 16)
    with pytest.raises(ConfigError, match="cannot be a tile"):
        train(
            RunConfig(
                dataset="digits", model="vit", attention="moba", patch_size=2, block_size=3, method="dense", epochs=1
            ),
            progress=False,
            log=None,
        )
    with pytest.raises(ConfigError, match="unknown attention 'sparse'; choose from: dense, moba"):
        RunConfig(attention="sparse").validate()


def test_vit_with_moba_trains_from_the_config(tmp_path):
    config = RunConfig(
        dataset="digits",
        model="vit",
        attention="moba",
        patch_size=2,
        block_size=4,
        top_k=2,
        vit_dim=32,
        vit_depth=2,
        vit_heads=2,
        method="dense",
        epochs=5,
        batch_size=32,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.0,
    )
    summary = train(config, tmp_path, progress=False, log=None)
    assert summary["final_test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    built = build_model("vit", (1, 8, 8), 10, vit={"attention": "moba", "patch_size": 1, "block_size": 16})
    assert built.tiles is not None  # tokens in tile order


def test_a_config_saved_before_a_setting_existed_reads_as_its_default():
    saved = {k: v for k, v in RunConfig().__dict__.items() if k != "top_k"}
    assert RunConfig().changed_from(saved) == []
    assert RunConfig(top_k=5).changed_from(saved) == ["top_k"]


def test_vit_with_block_routing_trains_and_its_layers_read_shared_blocks(tmp_path):
    """routing="block" reaches every MoBA layer, covers every block like dense attention, trains
    from the config, and bad values are named."""
    torch.manual_seed(0)
    kwargs = dict(patch_size=1, dim=16, depth=2, heads=2, attention="moba", block_size=16)
    block = ViT((1, 8, 8), 10, top_k=4, routing="block", **kwargs)
    assert all(b.attention.options.routing == "block" for b in block.blocks)
    dense = ViT((1, 8, 8), 10, patch_size=1, dim=16, depth=2, heads=2, attention="dense")
    dense.load_state_dict(block.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(block(x), dense(x), atol=1e-5, rtol=1e-5)
    by_token = ViT((1, 8, 8), 10, top_k=2, **kwargs)
    by_block = ViT((1, 8, 8), 10, top_k=2, routing="block", **kwargs)
    by_block.load_state_dict(by_token.state_dict())
    assert not torch.allclose(by_block(x), by_token(x), atol=1e-4)
    config = RunConfig(
        dataset="digits", model="vit", attention="moba", routing="block", patch_size=2, block_size=4, top_k=2,
        vit_dim=32, vit_depth=2, vit_heads=2, method="dense", epochs=5, batch_size=32, optimizer="adamw", lr=3e-3,
        weight_decay=0.0,
    )  # fmt: skip
    assert train(config, tmp_path, progress=False, log=None)["final_test_accuracy"] > 0.5
    built = Run(config).model  # what the trainer trains
    assert all(layer.attention.options.routing == "block" for layer in built.blocks)
    with pytest.raises(ConfigError, match="unknown routing 'tile'; choose from: token, block"):
        RunConfig(routing="tile").validate()
