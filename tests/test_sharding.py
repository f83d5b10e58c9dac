import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cxrjax import sharding
from cxrjax.engine import trainer
from tests.conftest import assert_same_training
from tests.test_train import _config, latest_params


def test_fsdp_splits_large_parameters_and_replicates_small_ones():
    mesh = sharding.make_mesh()
    tree = {
        "kernel": jax.ShapeDtypeStruct((96, 384), jnp.float32),
        "odd": jax.ShapeDtypeStruct((97, 383), jnp.float32),
        "bias": jax.ShapeDtypeStruct((384,), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    dp = sharding.state_shardings(tree, mesh)
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(dp))
    fsdp = sharding.state_shardings(tree, mesh, fsdp=True)
    assert fsdp["kernel"].spec == PartitionSpec(None, "data")  # the largest divisible dimension
    assert fsdp["odd"].spec == PartitionSpec()  # nothing divides over 4 devices
    assert fsdp["bias"].spec == PartitionSpec() and fsdp["step"].spec == PartitionSpec()


def test_fsdp_training_matches_data_parallel(tiny_shards, tmp_path):
    params = {}
    for fsdp in (False, True):
        config = _config(tiny_shards, epochs=1)
        config.fsdp = fsdp
        config.lr = 1e-4
        workdir = tmp_path / f"fsdp{fsdp}"
        trainer.train_and_evaluate(config, workdir)
        params[fsdp] = latest_params(workdir, fsdp=fsdp)[1]
    sharded = [x for x in jax.tree.leaves(params[True]) if not x.sharding.is_fully_replicated]
    assert sharded, "FSDP left every parameter replicated"
    assert_same_training(params[False], params[True], lr=1e-4)
