"""The public launchers as a user runs them: the seed's start script and the console script."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[2]


def launch(args, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "KUBEDISTILL_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # this test starts its own embedded Ray, on loopback
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_start_distill_pipeline_runs_a_config_directory_with_overrides(tiny_setup, tmp_path):
    (tmp_path / "conf").mkdir()
    config = tiny_config_dict(tiny_setup, tmp_path, max_steps=50, save_steps=0, eval_steps=0)
    (tmp_path / "conf" / "tiny.yaml").write_text(yaml.safe_dump(config))
    done = launch([sys.executable, str(REPO / "examples" / "start_distill_pipeline.py"), "--config_path", "conf",
                   "--config_name", "tiny", "max_steps=2", "kd_objective=skewed_reverse_kl"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished at step 2" in done.stdout
    assert (tmp_path / "output" / "checkpoint-2" / "student" / "model.safetensors").is_file()


def test_console_script_reports_a_bad_data_line_and_writes_nothing(tiny_setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1=", "answer": "2"}\nnot json\n')
    config = tiny_config_dict(tiny_setup, tmp_path)
    config["student"]["data_args"]["file_name"] = str(bad)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    done = launch([str(Path(sys.executable).parent / "kubedistill"), "train", "run.yaml"], tmp_path)
    assert done.returncode == 2
    assert "bad.jsonl:2: not valid JSON" in done.stderr
    assert not (tmp_path / "output").exists()
