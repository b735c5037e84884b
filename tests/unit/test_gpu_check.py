"""The CPU-checkable parts of the GPU check script (tests/gpu/gpu_check.py): it imports, parses its arguments,
finds and unpacks the carried wheels, stops clearly when one is missing, and counts model FLOPs right."""

import importlib.util
import os
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_defaults_run_every_part_with_the_h200_peak(gpu_check):
    args = gpu_check.parse_args([])
    assert args.parts == ["ipc", "megatron", "kd"]
    assert args.peak_tflops == 989.0 and args.wheels == gpu_check.DEFAULT_WHEELS
    assert (args.batch, args.seq, args.micro_batches, args.topk, args.smoke) == (4, 2048, 2, 64, False)


def test_parts_can_be_chosen_and_unknown_ones_are_refused(gpu_check, capsys):
    assert gpu_check.parse_args(["--only", "kd, ipc"]).parts == ["kd", "ipc"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "ipc,nccl"])
    assert "unknown part(s) nccl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "1"])


def test_the_wheel_folder_can_come_from_the_environment(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBEDISTILL_GPU_WHEELS", str(tmp_path))
    assert gpu_check.parse_args([]).wheels == tmp_path


def fake_wheel(folder: Path, name: str, files: dict) -> Path:
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_wheels_are_unpacked_once_into_a_site_folder(gpu_check, tmp_path):
    assert gpu_check.unpack_wheels(tmp_path) is None  # no wheels: nothing to add
    fake_wheel(tmp_path, "fakepkg", {"fakepkg/__init__.py": "VALUE = 1\n"})
    site = gpu_check.unpack_wheels(tmp_path)
    assert site == tmp_path / "site" and (site / "fakepkg" / "__init__.py").read_text() == "VALUE = 1\n"
    (site / "fakepkg" / "__init__.py").write_text("VALUE = 2\n")
    gpu_check.unpack_wheels(tmp_path)  # already unpacked: left alone
    assert (site / "fakepkg" / "__init__.py").read_text() == "VALUE = 2\n"


def test_carried_wheels_go_on_the_path_after_the_machines_packages(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(gpu_check, "WHEEL_MODULES", {"fakepkg_gpu_check": "fakepkg==1.0", "json": "json"})
    fake_wheel(tmp_path, "fakepkg", {"fakepkg_gpu_check/__init__.py": ""})
    assert gpu_check.setup_paths(tmp_path) == []
    assert sys.path[-1] == str(tmp_path / "site") and str(tmp_path / "site") in os.environ["PYTHONPATH"]
    assert sys.path.index(str(gpu_check.REPO / "trainer")) < sys.path.index(str(tmp_path / "site"))


def test_a_missing_wheel_stops_the_script_naming_it(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(gpu_check, "WHEEL_MODULES", {"no_such_module.core": "no-such-wheel==0.16.1"})
    assert gpu_check.main(["--wheels", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing wheel(s) no-such-wheel==0.16.1" in err and "fetch_wheels.sh" in err


def test_every_module_the_gpu_machine_lacks_has_a_wheel_in_the_fetch_script(gpu_check):
    fetch = (SCRIPT.parent / "fetch_wheels.sh").read_text()
    for wheel in gpu_check.WHEEL_MODULES.values():
        assert f'"{wheel.split("==")[0]}' in fetch


def test_matmul_weights_of_the_qwen2_0_5b_shape(gpu_check):
    # Qwen2-0.5B has 494,032,768 parameters: minus its norms (24·2·896 + 896) and q/k/v biases (24·1152), plus the
    # tied output layer counted once as a matmul (its embedding lookup is no matmul), the same 493,961,216.
    assert gpu_check.matmul_params(gpu_check.QWEN2_0_5B) == 494_032_768 - 43_904 - 27_648
    per_token = gpu_check.forward_flops_per_token(gpu_check.QWEN2_0_5B, 2048)
    assert per_token == 2 * 493_961_216 + 4 * 24 * 2048 * 14 * 64


def test_matmul_weights_equal_the_linear_layers_of_the_hf_model(gpu_check):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = gpu_check.ModelShape(hidden=64, layers=3, heads=4, kv_heads=2, ffn=96, vocab=300, tied=False)
    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu_check.matmul_params(shape) == linear


def test_mfu_is_model_flops_over_time_over_peak(gpu_check):
    assert gpu_check.model_flops_utilization(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert gpu_check.model_flops_utilization(4e12, 2.0, 1.0) == pytest.approx(2.0)
