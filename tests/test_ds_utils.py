"""DeepSpeed config builders (the original's fields), precision and hybrid-engine resolution."""
import logging

import pytest

from utils import ds_utils
from utils.ds_utils import (get_eval_ds_config, get_train_ds_config, hybrid_engine_supported, resolve_hybrid_engine,
                            resolve_precision, set_batch_sizes)


@pytest.mark.parametrize("bf16, accelerator, expected", [
    (True, "cuda", "bf16"),
    (True, "cpu", "bf16"),
    (False, "cuda", "fp16"),   # the original's default
    (False, "cpu", "fp32"),    # DeepSpeed's CPU accelerator has no fp16 training
    (False, "xpu", "fp32"),
])
def test_resolve_precision(bf16, accelerator, expected):
    assert resolve_precision(bf16, accelerator) == expected


def test_current_accelerator_is_cpu_in_tests():
    assert ds_utils.current_accelerator_name() == "cpu"


def test_train_config_fields_default_fp16():
    config = get_train_ds_config(offload=False, precision="fp16")
    assert config == {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": 4,
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": 2,
            "offload_param": {"device": "none"},
            "offload_optimizer": {"device": "none"},
            "stage3_param_persistence_threshold": 1e5,
            "stage3_max_live_parameters": 1e8,
            "stage3_prefetch_bucket_size": 1e8,
            "memory_efficient_linear": False,
        },
        "fp16": {"enabled": True, "loss_scale_window": 100},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "hybrid_engine": {
            "enabled": False,
            "max_out_tokens": 512,
            "inference_tp_size": 1,
            "release_inference_cache": False,
            "pin_parameters": True,
            "tp_gather_partition_size": 8,
        },
        "tensorboard": {"enabled": False, "output_path": "/ds_tensorboard_logs/", "job_name": "_tensorboard"},
    }


def test_train_config_arguments_land_in_their_fields():
    config = get_train_ds_config(offload=True, stage=3, enable_hybrid_engine=True, inference_tp_size=2,
                                 release_inference_cache=True, pin_parameters=False, tp_gather_partition_size=4,
                                 max_out_tokens=256, enable_tensorboard=True, memory_efficient_linear=True,
                                 tb_path="/runs/step1", tb_name="sft", precision="bf16")
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"] == {"device": "cpu"} and zero["offload_optimizer"] == {"device": "cpu"}
    assert zero["memory_efficient_linear"] is True
    assert config["hybrid_engine"] == {"enabled": True, "max_out_tokens": 256, "inference_tp_size": 2,
                                       "release_inference_cache": True, "pin_parameters": False,
                                       "tp_gather_partition_size": 4}
    assert config["tensorboard"] == {"enabled": True, "output_path": "/runs/step1/ds_tensorboard_logs/",
                                     "job_name": "sft_tensorboard"}
    assert config["bf16"] == {"enabled": True} and "fp16" not in config


def test_eval_config_fields_and_differences_from_train():
    config = get_eval_ds_config(offload=True, precision="fp16")
    assert config == {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": 4,
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": 0,
            "stage3_param_persistence_threshold": 1e4,
            "offload_param": {"device": "cpu"},
            "memory_efficient_linear": False,
        },
        "fp16": {"enabled": True},  # no loss_scale_window: eval engines never step
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }
    assert get_eval_ds_config(offload=False, stage=3)["zero_optimization"]["offload_param"] == {"device": "none"}
    assert get_eval_ds_config(offload=False, stage=3)["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("builder", [get_train_ds_config, get_eval_ds_config])
def test_precision_blocks(builder):
    assert builder(False, precision="bf16")["bf16"] == {"enabled": True}
    fp32 = builder(False, precision="fp32")
    assert fp32["fp16"] == {"enabled": False} and fp32["bf16"] == {"enabled": False}
    # precision=None resolves from bf16 and the accelerator (CPU in tests): bf16 stays bf16, else fp32.
    assert builder(False, bf16=True)["bf16"] == {"enabled": True}
    assert builder(False)["fp16"] == {"enabled": False}
    with pytest.raises(ValueError, match="precision"):
        builder(False, precision="fp8")


def test_mixed_precision_lora_fields():
    zero = get_train_ds_config(False, stage=3, enable_mixed_precision_lora=True, precision="bf16",
                               world_size=16, device_count=8)["zero_optimization"]
    assert zero["zero_quantized_nontrainable_weights"] is True
    assert zero["zero_hpz_partition_size"] == 8  # multi-node: one hpZ partition per node
    single_node = get_train_ds_config(False, stage=3, enable_mixed_precision_lora=True, precision="bf16",
                                      world_size=8, device_count=8)["zero_optimization"]
    assert "zero_hpz_partition_size" not in single_node
    assert "zero_quantized_nontrainable_weights" not in get_train_ds_config(False, precision="bf16")["zero_optimization"]


def test_set_batch_sizes():
    config = set_batch_sizes(get_train_ds_config(False, precision="fp32"), micro_batch_size=2, world_size=3,
                             gradient_accumulation_steps=4)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["train_batch_size"] == 24


def test_deepspeed_parses_the_configs():
    from deepspeed.runtime.config import DeepSpeedConfig

    train = DeepSpeedConfig(set_batch_sizes(get_train_ds_config(False, stage=3, precision="fp32"), 2, 1, 4))
    assert train.gradient_accumulation_steps == 4
    assert not train.float16_config.enabled and not train.bfloat16_config.enabled
    evaluation = DeepSpeedConfig(set_batch_sizes(get_eval_ds_config(False, stage=3, precision="bf16"), 2, 1, 1))
    assert evaluation.bfloat16_config.enabled


def test_hybrid_engine_only_on_cuda(monkeypatch, caplog):
    assert hybrid_engine_supported("cuda") and not hybrid_engine_supported("cpu")
    assert resolve_hybrid_engine(True, "cuda") is True
    assert resolve_hybrid_engine(False, "cpu") is False
    monkeypatch.setattr(ds_utils, "_logged_once", set())
    with caplog.at_level(logging.WARNING, logger="utils.ds_utils"):
        assert resolve_hybrid_engine(True, "cpu") is False
        assert resolve_hybrid_engine(True, "cpu") is False
    warnings = [r for r in caplog.records if "--enable_hybrid_engine" in r.getMessage()]
    assert len(warnings) == 1
