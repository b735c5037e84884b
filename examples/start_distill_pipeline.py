#!/usr/bin/env python
"""Start a distillation pipeline from a Hydra config directory.

    python examples/start_distill_pipeline.py --config_path examples/tiny --config_name distill [key=value ...]
"""
import sys

from distill_trainer.cli import start_distill_pipeline

if __name__ == "__main__":
    sys.exit(start_distill_pipeline())
