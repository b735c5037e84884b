"""The CPU-checkable parts of the GPU check script (tests/gpu/gpu_check.py): it imports, parses its arguments,
finds and unpacks the carried wheels (after the machine's packages, also in its child processes), stops clearly
when one is missing or transformers is too old, counts model FLOPs and the teacher's share of a step right, sizes
the channel's slots as the channel does, gives each child its own resource tracker, and survives a failed part."""

import importlib.util
import json
import multiprocessing
import os
import subprocess
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


def test_defaults_run_every_part_with_the_h200_peak(gpu_check, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_check.parse_args([])
    assert args.parts == ["ipc", "megatron", "kd", "sample"]
    assert args.peak_tflops == 989.0 and args.wheels == gpu_check.DEFAULT_WHEELS
    assert (args.batch, args.seq, args.micro_batches, args.topk, args.smoke) == (4, 2048, 2, 64, False)
    assert (args.teacher_memory_fraction, args.student_memory_fraction) == (0.45, 0.45)
    assert args.full_vocab_seq == 1024 and args.fail_part is None and args.json is None
    assert args.time_limit == 540 <= 540  # every wait ends before the device tool's 600 s per command


def test_the_json_file_goes_under_out_when_the_device_tool_sets_it(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).json == tmp_path / "gpu_check.json"
    assert gpu_check.parse_args(["--json", "x.json"]).json == Path("x.json")


def test_parts_can_be_chosen_and_unknown_ones_are_refused(gpu_check, capsys):
    assert gpu_check.parse_args(["--only", "kd, ipc"]).parts == ["kd", "ipc"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "ipc,nccl"])
    assert "unknown part(s) nccl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "1"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--fail-part", "nccl"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--student-memory-fraction", "1.5"])
    assert gpu_check.parse_args(["--fail-part", "kd"]).fail_part == "kd"


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
    site = str(tmp_path / "site")
    assert sys.path[-1] == site
    assert sys.path.index(str(gpu_check.REPO / "trainer")) < sys.path.index(site)
    # PYTHONPATH entries go before site-packages in a new interpreter: the wheels' site must not be there.
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(gpu_check.REPO / "trainer")]
    # A spawned process (how the check starts teacher and student) sees the same order: machine packages first.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child_path = pool.apply(eval, ("__import__('sys').path",))
    packages = [i for i, p in enumerate(child_path) if p.endswith("site-packages")]
    assert child_path[-1] == site and packages and max(packages) < child_path.index(site)


def test_setting_paths_twice_keeps_pythonpath_short(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(gpu_check, "WHEEL_MODULES", {})
    gpu_check.setup_paths(tmp_path)
    gpu_check.setup_paths(tmp_path)
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(gpu_check.REPO / "trainer"), "/elsewhere"]


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


def test_transformers_versions_the_megatron_path_takes(gpu_check):
    assert gpu_check.transformers_problem("4.44.2") is not None and "4.45" in gpu_check.transformers_problem("4.44.2")
    for version in ("4.45.0", "4.57.6", "5.0.0rc1", "5.25.0", "6.0.0.dev0"):
        assert gpu_check.transformers_problem(version) is None, version
    assert gpu_check._version_tuple("5.0.0rc1") == (5, 0, 0) and gpu_check._version_tuple("4.45") == (4, 45)


def test_the_teacher_is_credited_with_the_part_of_each_forward_inside_a_step(gpu_check):
    forwards = [(0.0, 1.0), (1.0, 3.0), (5.0, 6.0)]
    credited, busy = gpu_check.teacher_credit(forwards, 0.5, 2.0)
    assert credited == pytest.approx(0.5 + 0.5) and busy == pytest.approx(0.5 + 1.0)
    assert gpu_check.teacher_credit(forwards, 3.0, 5.0) == (0.0, 0.0)  # the teacher idled: nothing to credit
    assert gpu_check.teacher_credit(forwards, -1.0, 10.0) == (3.0, 4.0)


def test_slot_size_is_what_the_channel_allocates(gpu_check):
    import torch

    sys.path.insert(0, str(gpu_check.REPO / "trainer"))
    from distill_trainer.channel import SharedMemory

    tensors = {"values": torch.randn(7, 5), "indices": torch.zeros(7, 5, dtype=torch.int32), "tail": torch.zeros(7)}
    transport = SharedMemory(slots=2, clean_up=False)
    try:
        transport.publish(tensors)
        transport.publish(tensors)
        assert gpu_check._channel_bytes(transport) == gpu_check._ring_bytes(tensors, 2)
    finally:
        transport.close()


def test_each_child_gets_its_own_resource_tracker(gpu_check, monkeypatch):
    from multiprocessing import resource_tracker

    for name in ("_resource_tracker", "ensure_running", "register", "unregister", "getfd"):
        monkeypatch.setattr(resource_tracker, name, getattr(resource_tracker, name))
    old = resource_tracker._resource_tracker
    gpu_check._use_own_resource_tracker()
    new = resource_tracker._resource_tracker
    assert new is not old
    # What shared_memory and the channel call goes to the new tracker (replacing the instance alone would not).
    assert resource_tracker.register.__self__ is new and resource_tracker.unregister.__self__ is new


def test_a_failed_part_is_recorded_and_the_next_part_still_reports(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "path", [str(SCRIPT.parent), *sys.path])  # the children import gpu_check by name
    monkeypatch.setenv("PYTHONPATH", "")
    figures = tmp_path / "out" / "figures.json"
    argv = ["--smoke", "--only", "ipc,kd", "--fail-part", "ipc", "--json", str(figures), "--wheels", str(tmp_path),
            "--repeats", "2"]
    assert gpu_check.main(argv) == 1
    report = json.loads(figures.read_text())
    assert report["failed"] == ["ipc"]
    assert report["parts"]["ipc"]["status"] == "failed"
    assert "deliberate failure of the student process" in report["parts"]["ipc"]["error"]
    kd = report["parts"]["kd"]
    assert kd["status"] == "ok" and kd["seconds"] > 0
    assert {"full / straightforward", "full / kubedistill", "top-k / straightforward", "top-k / kubedistill"} <= set(
        kd["figures"])
    out = capsys.readouterr()
    assert "part ipc FAILED" in out.err and "3. KD loss" in out.out and "FAILED: ipc" in out.out


def test_the_smoke_ipc_part_runs_clean_in_its_own_processes(tmp_path):
    """The CPU smoke run of the ipc part: no resource-tracker KeyError or leak warnings, contents right."""
    figures = tmp_path / "ipc.json"
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "ipc", "--repeats", "3", "--wheels",
                           str(tmp_path), "--json", str(figures)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "KeyError" not in done.stderr and "leaked" not in done.stderr, done.stderr
    parts = json.loads(figures.read_text())["parts"]["ipc"]
    assert parts["status"] == "ok"
    for key, figure in parts["figures"].items():
        assert figure["contents_ok"] and figure["step"]["contents_ok"], key
        assert figure["zero_copy"] is None and figure["one_address_per_slot"] is None  # shared memory: n/a


def fake_dist(folder: Path, name: str, version: str, requires: list[str] = ()) -> None:
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    (info / "METADATA").write_text("\n".join(lines + [f"Requires-Dist: {r}" for r in requires]) + "\n")


def test_carried_wheels_whose_needs_the_machine_does_not_meet_are_named(gpu_check, monkeypatch, tmp_path):
    machine, site = tmp_path / "machine", tmp_path / "site"
    fake_dist(machine, "gpucheck-machinepkg", "1.0")
    fake_dist(machine, "gpucheck-shadowed", "1.0")  # the machine has it: the carried copy is never imported
    fake_dist(site, "gpucheck-shadowed", "3.0", ["gpucheck-machinepkg>=9"])
    fake_dist(site, "gpucheck-carried", "2.0", ["gpucheck-machinepkg>=2.0", "gpucheck-absent",
                                                "gpucheck-machinepkg>=5; extra == 'docs'", "gpucheck-machinepkg<5"])
    monkeypatch.setattr(sys, "path", [*sys.path, str(machine), str(site)])  # machine first, wheels last
    assert gpu_check.unmet_requirements(site) == [
        "gpucheck-carried 2.0 needs gpucheck-machinepkg>=2.0; Python finds gpucheck-machinepkg 1.0 first",
        "gpucheck-carried 2.0 needs gpucheck-absent; it is missing",
    ]
    assert gpu_check.unmet_requirements(tmp_path / "nothing") == []


def test_a_too_old_transformers_fails_the_megatron_part_before_it_starts(gpu_check, monkeypatch, tmp_path, capsys):
    import transformers

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    figures = tmp_path / "figures.json"
    assert gpu_check.main(["--smoke", "--only", "megatron", "--json", str(figures), "--wheels", str(tmp_path)]) == 1
    megatron = json.loads(figures.read_text())["parts"]["megatron"]
    assert megatron["status"] == "failed" and "transformers 4.40.0 is older than 4.45" in megatron["error"]
    assert megatron["figures"] == {}  # nothing ran: no model was written, no process started
    assert "part megatron not run" in capsys.readouterr().err


def test_cuda_ipc_figures_need_one_address_per_slot_and_views_in_the_buffer(gpu_check):
    run = {"kind": "cuda_ipc", "repeats": 4, "bytes": 1000}
    teacher = {"publish": [0.5, 0.4, 0.3, 0.2, 9.0], "wait": [0.0, 0.1, 0.1, 0.0, 9.0], "channel_bytes": 2500,
               "memory": {"max_reserved": 7}}
    student = {"open": [0.3, 0.1, 0.1, 0.1], "read": [0.2] * 4, "correct": [True] * 4, "zero_copy": [True] * 4,
               "addresses_per_slot": {0: 1, 1: 1}, "free_drop": 0, "gpu_work_s": 0.005,
               "memory": {"max_reserved": 3, "device_free": 10},
               "steps": [{"release": 1e-5, "launch": 1e-3, "wall": 0.01, "correct": True}] * 4}
    figure = gpu_check._ipc_figures(run, teacher, student)
    assert figure["publish_s"] == pytest.approx(0.25)  # median of the hand-offs' publish minus their slot wait
    assert figure["slot_wait_s"] == pytest.approx(0.05) and figure["first_open_s"] == 0.3
    assert figure["zero_copy"] and figure["one_address_per_slot"] and figure["step"]["contents_ok"]
    # The slot's buffer moved (a view opened elsewhere) or a view was not in it: no longer zero-copy.
    assert not gpu_check._ipc_figures(run, teacher, {**student, "addresses_per_slot": {0: 2, 1: 1}})[
        "one_address_per_slot"]
    assert not gpu_check._ipc_figures(run, teacher, {**student, "zero_copy": [True, False, True, True]})["zero_copy"]
    shared = gpu_check._ipc_figures({**run, "kind": "shared_memory"}, teacher, {**student, "steps": []})
    assert shared["zero_copy"] is None and shared["one_address_per_slot"] is None and shared["step"] is None


@pytest.mark.slow
def test_the_whole_smoke_run_passes(tmp_path):
    """All three parts on CPU (about 30 s on 2 cores): every part ok, the training checks hold."""
    figures = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--wheels", str(tmp_path), "--json", str(figures)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "KeyError" not in done.stderr and "leaked" not in done.stderr
    report = json.loads(figures.read_text())
    assert report["failed"] == [] and {p["status"] for p in report["parts"].values()} == {"ok"}
    for name, case in report["parts"]["megatron"]["figures"].items():
        if isinstance(case, dict) and "loss" in case:
            assert case["loss_and_grad_finite"] and case["parameter_changed"] and case["loss_falls"], name
            assert case["channel"]["measured_bytes"] == case["channel"]["share_bytes"], name
