"""`fp8dispatch tune --model` and `fp8dispatch.models`: a model's linear shapes from a config, a
checkpoint's headers, an index, a directory or a module; tuning exactly those; merging the result."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fp8dispatch import bench, models, tuning
from fp8dispatch.cli import main
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError
from fp8dispatch.nn import Fp8Linear

CPU = torch.device("cpu")

# DeepSeek-V3's config.json, the fields that shape its linear layers (and some that do not).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "first_k_dense_replace": 3, "num_hidden_layers": 61, "vocab_size": 129280,
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}
DEEPSEEK_V3_SHAPES = [
    (1536, 7168),  # q_a_proj
    (24576, 1536),  # q_b_proj: 128 heads x (128 + 64)
    (576, 7168),  # kv_a_proj_with_mqa: 512 + 64
    (32768, 512),  # kv_b_proj: 128 heads x (128 + 128)
    (7168, 16384),  # o_proj: 128 heads x 128
    (18432, 7168), (7168, 18432),  # the dense MLP of the first 3 layers: gate/up, down
    (2048, 7168), (7168, 2048),  # each routed expert, and the one shared expert
]
LLAMA_3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
LLAMA_3_8B_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q and o, k and v, gate/up, down


def test_deepseek_v3_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    assert models.shapes_of(tmp_path / "config.json") == DEEPSEEK_V3_SHAPES
    assert models.shapes_of(str(tmp_path)) == DEEPSEEK_V3_SHAPES  # a model directory with only a config


def test_llama_config_and_a_multimodal_wrapper(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B))
    assert models.shapes_of(tmp_path / "config.json") == LLAMA_3_8B_SHAPES
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": LLAMA_3_8B}))
    assert models.shapes_of(tmp_path / "config.json") == LLAMA_3_8B_SHAPES


def layer(prefix, n, k, dtype=torch.bfloat16):
    return {f"{prefix}.weight": torch.zeros(n, k, dtype=dtype)}


def test_checkpoint_headers(tmp_path):
    """2-D `*.weight` tensors, deduplicated; embeddings, norms, biases and scales are not layers."""
    tensors = {"model.embed_tokens.weight": torch.zeros(100, 64, dtype=torch.bfloat16),
               "model.norm.weight": torch.zeros(64, dtype=torch.bfloat16),
               **layer("model.layers.0.self_attn.q_proj", 96, 64), **layer("model.layers.1.self_attn.q_proj", 96, 64),
               **layer("model.layers.0.mlp.down_proj", 64, 160),
               "model.layers.0.mlp.down_proj.bias": torch.zeros(64)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert sorted(models.shapes_of(tmp_path / "model.safetensors")) == [(64, 160), (96, 64)]


def test_an_fp8_checkpoint_gives_its_fp8_layers_only(tmp_path):
    tensors = {**layer("model.layers.0.mlp.gate", 8, 64),  # the router stays bf16
               **layer("model.layers.0.mlp.up_proj", 160, 64, torch.float8_e4m3fn),
               "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 1),
               **layer("lm_head", 100, 64)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert models.shapes_of(tmp_path / "model.safetensors") == [(160, 64)]


def test_an_index_reads_the_headers_of_its_shards(tmp_path):
    save_file(layer("a.q_proj", 96, 64), tmp_path / "model-00001-of-00002.safetensors")
    save_file({**layer("a.o_proj", 64, 96), **layer("b.q_proj", 96, 64)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / models.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.q_proj.weight": "model-00001-of-00002.safetensors", "a.o_proj.weight": "model-00002-of-00002.safetensors",
        "b.q_proj.weight": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B))  # the checkpoint beats the config
    assert sorted(models.shapes_of(tmp_path / models.INDEX)) == [(64, 96), (96, 64)]
    assert sorted(models.shapes_of(tmp_path)) == [(64, 96), (96, 64)]


def test_a_module(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64),
                                torch.nn.Linear(64, 96), Fp8Linear(256, 128))
    assert models.shapes_of(model) == [(96, 64), (64, 96), (128, 256)]


@pytest.mark.parametrize("content, error", [
    (None, "no such file or directory"),
    ("{not json", "not readable JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"model_type": "bert-ish", "vocab_size": 10}), "expected a transformer config with hidden_size"),
    (json.dumps({**LLAMA_3_8B, "hidden_size": "4096"}), "hidden_size: expected an int >= 0, got '4096'"),
])
def test_what_is_not_a_model_is_a_clear_error(tmp_path, content, error):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(Fp8ValueError, match=error):
        models.shapes_of(path)


def test_a_broken_checkpoint_or_a_missing_shard_names_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(Fp8ValueError, match="model.safetensors is not a safetensors file"):
        models.shapes_of(tmp_path / "model.safetensors")
    (tmp_path / models.INDEX).write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    with pytest.raises(Fp8ValueError, match="cannot read .*gone.safetensors"):
        models.shapes_of(tmp_path / models.INDEX)
    with pytest.raises(Fp8TypeError, match="model: expected an nn.Module or a path"):
        models.shapes_of(42)
    with pytest.raises(Fp8ValueError, match="no linear layers"):
        models.shapes_of(torch.nn.ReLU())


# --- tuning a model -----------------------------------------------------------------------------

TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
        "num_key_value_heads": 1}  # q/o 128x128, k/v 64x128, gate/up 256x128, down 128x256


@pytest.fixture
def user_table(sandbox, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "none")
    path = tmp_path / "routing.json"
    sandbox.env(FP8DISPATCH_TUNING=str(path))
    return path


def an_entry_elsewhere(path):
    """A table of this environment with one entry for a shape the model does not have."""
    rows = bench.run(bench.points([bench.Shape(4, 0, 640)], ops=("quantize",), granularities=("row",)),
                     ["reference"], bench.Settings(CPU, 1, 2, auto=False, baselines=False))
    tuning.write(path, tuning.merge(None, tuning.build_table(rows, tuning.environment(CPU))))


def measured_keys(path):
    (table,) = tuning.read(path)["tables"]
    return {(e["op"], e["variant"].split(":")[0], e["n"], e["k"], e["m_bucket"]) for e in table["entries"]}


def test_tune_model_measures_its_shapes_and_merges(user_table, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    an_entry_elsewhere(user_table)
    code = main(["tune", "--model", str(tmp_path / "config.json"), "--device", "cpu", "--backends", "reference",
                 "--m", "2", "--recipes", "row", "--granularities", "row", "--runs", "1", "--warmup", "0"])
    assert code == 0, capsys.readouterr().err
    keys = measured_keys(user_table)
    assert ("quantize", "row", 0, 640, 4) in keys  # the entry for another shape stays
    assert {(n, k) for op, _, n, k, m in keys if op == "matmul"} == {(128, 128), (64, 128), (256, 128), (128, 256)}
    assert {m for *_, m in keys} == {2, 4}
    assert "4 linear shapes" in capsys.readouterr().err


def test_tune_a_module_from_python(user_table):
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 128))
    an_entry_elsewhere(user_table)
    measured = models.tune(model, m=(3,), device="cpu", backends=["reference"], ops=("matmul",),
                           recipes=("tensor",), runs=1, warmup=0)
    assert {(e["n"], e["k"], e["m_bucket"]) for e in measured["entries"]} == {(64, 128, 4), (128, 64, 4)}
    assert len(measured_keys(user_table)) == 3


@pytest.mark.parametrize("extra, error", [
    (["--shapes", "deepseek"], "--model: measures the model's own shapes; drop --shapes"),
    (["--quick"], "drop --quick"),
    (["--m", "0"], "--m: expected a comma list of positive ints"),
])
def test_tune_model_usage_errors_exit_2_with_one_line(tmp_path, capsys, extra, error):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert main(["tune", "--model", str(tmp_path / "config.json"), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err and err.startswith("fp8dispatch tune: ")


def test_tune_model_of_a_missing_path_exits_2_with_one_line(tmp_path, capsys):
    assert main(["tune", "--model", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model: no such file or directory" in err


def test_without_a_gpu_tune_model_refuses_before_probing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert main(["tune", "--model", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.cuda.is_available() is False" in err


def test_torchao_and_on_a_gpu_the_reference_are_left_out_unless_named(monkeypatch):
    from fp8dispatch import registry

    monkeypatch.setattr(registry, "probe_result", lambda name: None)
    on_gpu, on_cpu = models.default_backends(torch.device("cuda")), models.default_backends(CPU)
    assert "torchao" not in on_gpu and "reference" not in on_gpu and {"triton", "torch", "fbgemm"} <= set(on_gpu)
    assert "torchao" not in on_cpu and "reference" in on_cpu
